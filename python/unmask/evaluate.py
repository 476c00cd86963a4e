"""`unmask eval`: exact-match accuracy (with a 95% interval), model calls, tokens per call
and speed of every decoding strategy on unmask.tasks, per task: a table, JSON lines and a
PNG plot (matplotlib) of accuracy against tokens per call, one line per strategy family."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from unmask import tasks
from unmask.sampler import generate


Z_95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion: unlike p +- 1.96 sqrt(p(1-p)/n) it
    stays inside [0, 1] and is not empty at 0 or n correct answers."""
    if total == 0:
        return 0.0, 1.0
    p, z2 = correct / total, Z_95 * Z_95
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z_95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact at the ends (rounding would leave 1e-17)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


@dataclasses.dataclass
class StrategyResult:
    strategy: str
    kwargs: dict
    accuracy: dict[str, float]
    nfe: float  # model calls per generation, mean over tasks (a batch shares them)
    tokens_per_step: float  # answer positions per model call
    tokens_per_second: float
    model: str = ""
    examples: int = 0  # per task
    interval: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # 95%, per task
    calls: dict[str, int] = dataclasses.field(default_factory=dict)  # model calls per task

    @property
    def family(self) -> str:
        """The line it belongs to in the plot (evaluate.family of its arguments)."""
        return family(self.kwargs)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def mean_interval(self) -> tuple[float, float]:
        """The 95% interval of the mean over tasks (tasks weigh equally, same n each)."""
        correct = round(self.mean_accuracy * self.examples * len(self.accuracy))
        return wilson_interval(correct, self.examples * len(self.accuracy))


def family(kwargs: dict) -> str:
    """The line a strategy belongs to in the plot: how it decides what to commit."""
    if kwargs.get("speculate"):
        return "speculative"
    if kwargs.get("remasking", "low_confidence") != "low_confidence":
        return f"steps, {kwargs['remasking']}"
    return next(name for name in ("threshold", "factor", "steps") if name in kwargs)


def strategies(answer_length: int = tasks.ANSWER_LENGTH) -> list[tuple[str, dict]]:
    """steps = gen_length, /2, /4; thresholds 0.5-0.95; factor; each remasking kind."""
    out = [(f"steps={s}", {"steps": s}) for s in (answer_length, answer_length // 2, answer_length // 4)]
    out += [(f"threshold={t}", {"threshold": t}) for t in (0.5, 0.7, 0.9, 0.95)]
    out += [(f"factor={f}", {"factor": f}) for f in (0.5, 1.0)]
    out += [(f"steps={answer_length} remasking={kind}", {"steps": answer_length, "remasking": kind})
            for kind in ("margin", "entropy", "random")]
    # Speculative decoding: the answers of steps=answer_length in fewer model calls.
    out += [(f"steps={answer_length} speculate={answer_length}", {"steps": answer_length, "speculate": answer_length})]
    return out


@torch.no_grad()
def evaluate(model, *, n_per_task: int = 256, seed: int = 1_000_003, model_name: str = "") -> list[StrategyResult]:
    tokenizer = tasks.CharTokenizer()
    data = {task: tasks.examples(n_per_task, seed=seed, tasks=(task,)) for task in tasks.TASKS}
    encoded = {task: tasks.encode_batch(batch, tokenizer) for task, batch in data.items()}
    results = []
    for name, kwargs in strategies():
        accuracy, interval, calls, nfe, seconds, tokens = {}, {}, {}, 0, 0.0, 0
        for task, (ids, mask, _) in encoded.items():
            started = time.perf_counter()
            out = generate(model, ids[:, :tasks.PROMPT_LENGTH], attention_mask=mask[:, :tasks.PROMPT_LENGTH],
                           gen_length=tasks.ANSWER_LENGTH, block_length=tasks.ANSWER_LENGTH, stop_at_eos=False,
                           **kwargs)
            seconds += time.perf_counter() - started
            answers = [tokenizer.decode(row) for row in out.tokens.tolist()]
            correct = sum(a == e.answer for a, e in zip(answers, data[task]))
            accuracy[task], interval[task] = correct / n_per_task, wilson_interval(correct, n_per_task)
            calls[task] = out.nfe
            nfe += out.nfe
            tokens += out.tokens.numel()
        mean_nfe = nfe / len(encoded)
        results.append(StrategyResult(name, kwargs, accuracy, mean_nfe, tasks.ANSWER_LENGTH / mean_nfe,
                                      tokens / seconds, model_name, n_per_task, interval, calls))
    return results


def format_table(results: list[StrategyResult]) -> str:
    """Per task: accuracy [95% interval]; then the mean, model calls, tokens per call, tokens/s."""
    header = (f"{'strategy':<26}" + "".join(f"{t:>25}" for t in tasks.TASKS)
              + f"{'mean':>25}{'calls':>7}{'tok/call':>9}{'tok/s':>8}")
    lines = [header, "-" * len(header)]

    def cell(value, bounds) -> str:
        return f"{value:6.1%} [{bounds[0]:6.1%}, {bounds[1]:6.1%}]"

    for r in results:
        lines.append(f"{r.strategy:<26}" + "".join(f"{cell(r.accuracy[t], r.interval[t]):>25}" for t in tasks.TASKS)
                     + f"{cell(r.mean_accuracy, r.mean_interval):>25}{r.nfe:>7.1f}{r.tokens_per_step:>9.2f}"
                     + f"{r.tokens_per_second:>8.0f}")
    return "\n".join(lines)


def plot(results: list[StrategyResult], path: Path) -> bool:
    """Mean accuracy (with its 95% interval) against tokens per call, one line per
    strategy family; the accuracy axis starts where the data spreads. False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not results:
        raise ValueError("plot: no results to draw")
    figure, axis = plt.subplots(figsize=(8, 5))
    families: dict[str, list[StrategyResult]] = {}
    placed: dict[tuple[float, float], int] = {}  # labels already at a point (families can share one)
    for r in results:
        families.setdefault(r.family, []).append(r)
    for name, members in families.items():
        members = sorted(members, key=lambda r: r.tokens_per_step)
        x = [r.tokens_per_step for r in members]
        y = [r.mean_accuracy for r in members]
        low = [max(0.0, r.mean_accuracy - r.mean_interval[0]) for r in members]  # matplotlib refuses -1e-17
        high = [max(0.0, r.mean_interval[1] - r.mean_accuracy) for r in members]
        axis.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=name)
        if name in ("threshold", "factor", "steps"):  # the settings beside each point, e.g. 0.5/0.7 for threshold
            at: dict[tuple[float, float], list[str]] = {}
            for r in members:
                at.setdefault((r.tokens_per_step, r.mean_accuracy), []).append(r.strategy.split("=")[-1])
            for (tx, ty), labels in at.items():
                below = placed.get((tx, ty), 0)
                placed[(tx, ty)] = below + 1
                axis.annotate(f"{name} " * (below > 0) + "/".join(labels), (tx, ty), fontsize=8,
                              xytext=(5, -10 - 11 * below), textcoords="offset points")
    lows = [r.mean_interval[0] for r in results]
    spread = max(r.mean_interval[1] for r in results) - min(lows)
    axis.set_ylim(max(0.0, min(lows) - 0.1 * spread - 0.005), min(1.0, max(r.mean_interval[1] for r in results))
                  + 0.1 * spread + 0.005)
    axis.set_xlabel("answer tokens per model call")
    axis.set_ylabel("exact match, mean over tasks (95% interval)")
    model = results[0].model if results and results[0].model else "model"
    axis.set_title(f"unmask eval ({model}, {results[0].examples if results else 0} examples per task)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_json(results: list[StrategyResult], path: Path) -> None:
    """One line per strategy: its name, arguments, family, the model, and per task the
    accuracy, its 95% interval and the model calls."""
    path.write_text("".join(json.dumps({**dataclasses.asdict(r), "family": r.family, "mean_accuracy": r.mean_accuracy,
                                        "mean_interval": r.mean_interval}) + "\n" for r in results))
