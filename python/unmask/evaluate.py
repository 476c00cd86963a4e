"""`unmask eval`: accuracy (exact match, or validity where a task has many answers; with a
95% interval), model calls, tokens per call and speed of every decoding strategy on
unmask.tasks, per task: a table, JSON lines and a PNG plot (matplotlib) of accuracy
against tokens per call, one panel per task group, one line per strategy family."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from unmask import tasks, validation
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


GROUPS = {"short": tasks.TASKS, "long": tasks.LONG_TASKS}  # task groups: one answer length each


@dataclasses.dataclass
class StrategyResult:
    strategy: str
    kwargs: dict  # generate's arguments; "tokens_per_step": d stands for steps = answer length / d
    accuracy: dict[str, float]  # per task: exact match, or validity for the tasks with many answers
    nfe: float  # model calls per generation, mean over tasks (a batch shares them)
    tokens_per_step: float  # answer positions per model call, over every task
    tokens_per_second: float
    model: str = ""
    examples: int = 0  # per task
    interval: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # 95%, per task
    calls: dict[str, int] = dataclasses.field(default_factory=dict)  # model calls per task
    canvases: dict[str, int] = dataclasses.field(default_factory=dict)  # canvases per row per task (>= calls)

    @property
    def family(self) -> str:
        """The line it belongs to in the plot (evaluate.family of its arguments)."""
        return family(self.kwargs)

    def group_tasks(self, group: str) -> list[str]:
        return [t for t in GROUPS[group] if t in self.accuracy]

    def accuracy_over(self, names: list[str]) -> float:
        return sum(self.accuracy[t] for t in names) / len(names)

    def interval_over(self, names: list[str]) -> tuple[float, float]:
        """The 95% interval of the mean over tasks `names` (they weigh equally, same n each)."""
        correct = round(self.accuracy_over(names) * self.examples * len(names))
        return wilson_interval(correct, self.examples * len(names))

    def group_accuracy(self, group: str) -> float:
        return self.accuracy_over(self.group_tasks(group))

    def group_interval(self, group: str) -> tuple[float, float]:
        return self.interval_over(self.group_tasks(group))

    def group_tokens_per_call(self, group: str) -> float:
        names = self.group_tasks(group)
        return tasks.layout(names[0])[1] * len(names) / sum(self.calls[t] for t in names)

    @property
    def mean_accuracy(self) -> float:
        return self.accuracy_over(list(self.accuracy))

    @property
    def mean_interval(self) -> tuple[float, float]:
        return self.interval_over(list(self.accuracy))


def family(kwargs: dict) -> str:
    """The line a strategy belongs to in the plot: how it decides what to commit."""
    if kwargs.get("speculate"):
        return "speculative"
    if kwargs.get("revise_threshold") is not None:
        return "self-correction"
    if kwargs.get("remasking", "low_confidence") != "low_confidence":
        return f"steps, {kwargs['remasking']}"
    if "threshold" in kwargs and ("steps" in kwargs or "tokens_per_step" in kwargs):
        return "steps with threshold"
    return next(name for name in ("threshold", "factor", "tokens_per_step") if name in kwargs).replace(
        "tokens_per_step", "steps")


def strategies(strategy_set: str = "all") -> list[tuple[str, dict]]:
    """"all": steps = A, A/2, A/4 (A the task's answer length); thresholds 0.5-0.95;
    factor; each remasking kind; speculative; self-correction with thresholds.
    "student" (a distilled model): the steps, threshold and self-correction ones."""
    out = [(f"steps=A/{d}" if d > 1 else "steps=A", {"tokens_per_step": d}) for d in (1, 2, 4)]
    out += [(f"threshold={t}", {"threshold": t}) for t in (0.5, 0.7, 0.9, 0.95)]
    # Self-correction: a strict check with two verification canvases, and a lenient one
    # with five (two digits cover 24 positions, so no pair stays masked together for long).
    corrections = [("threshold=0.5 revise=0.5", {"threshold": 0.5, "revise_threshold": 0.5})]
    corrections += [(f"threshold={t} revise=0.1 groups=5", {"threshold": t, "revise_threshold": 0.1, "revise_groups": 5})
                    for t in (0.3, 0.5)]
    if strategy_set == "student":
        return out + corrections
    if strategy_set != "all":
        raise ValueError(f"strategy_set must be 'all' or 'student', got {strategy_set!r}")
    out += [(f"factor={f}", {"factor": f}) for f in (0.5, 1.0)]
    out += [(f"steps=A remasking={kind}", {"tokens_per_step": 1, "remasking": kind})
            for kind in ("margin", "entropy", "random")]
    # Speculative decoding: the answers of steps=A in fewer model calls.
    out += [("steps=A speculate=8", {"tokens_per_step": 1, "speculate": 8})]
    return out + corrections


def generate_arguments(kwargs: dict, answer_length: int) -> dict:
    """generate's arguments for a task whose answer has answer_length positions."""
    out = dict(kwargs)
    if "tokens_per_step" in out:
        out["steps"] = answer_length // out.pop("tokens_per_step")
    return out


@torch.no_grad()
def evaluate(model, *, n_per_task: int = 256, seed: int = 1_000_003, model_name: str = "",
             task_names: tuple[str, ...] = tasks.ALL_TASKS, strategy_set: str = "all") -> list[StrategyResult]:
    validation.check_int("n_per_task", n_per_task, low=1)
    tokenizer = tasks.CharTokenizer()
    data = {task: tasks.examples(n_per_task, seed=seed, tasks=(task,)) for task in task_names}
    encoded = {task: tasks.encode_batch(batch, tokenizer) for task, batch in data.items()}
    results = []
    for name, kwargs in strategies(strategy_set):
        accuracy, interval, calls, canvases, seconds, tokens = {}, {}, {}, {}, 0.0, 0
        for task, (ids, mask, _) in encoded.items():
            prompt_length, answer_length = tasks.layout(task)
            started = time.perf_counter()
            out = generate(model, ids[:, :prompt_length], attention_mask=mask[:, :prompt_length],
                           gen_length=answer_length, block_length=answer_length, stop_at_eos=False,
                           **generate_arguments(kwargs, answer_length))
            seconds += time.perf_counter() - started
            answers = [tokenizer.answer(row) for row in out.tokens.tolist()]
            correct = sum(tasks.correct(e, a) for a, e in zip(answers, data[task]))
            accuracy[task], interval[task] = correct / n_per_task, wilson_interval(correct, n_per_task)
            calls[task], canvases[task] = out.nfe, out.canvases
            tokens += out.tokens.numel()
        positions = sum(tasks.layout(task)[1] for task in encoded)
        results.append(StrategyResult(name, kwargs, accuracy, sum(calls.values()) / len(calls),
                                      positions / sum(calls.values()), tokens / seconds, model_name, n_per_task,
                                      interval, calls, canvases))
    return results


def _groups(results: list[StrategyResult]) -> list[str]:
    return [g for g in GROUPS if results and results[0].group_tasks(g)]


def format_table(results: list[StrategyResult]) -> str:
    """Per task group: per task accuracy [95% interval]; the group's mean, model calls
    per answer, canvases per call and answer positions per call; tokens/s over all."""
    def cell(value, bounds) -> str:
        return f"{value:6.1%} [{bounds[0]:6.1%}, {bounds[1]:6.1%}]"

    several = len({r.model for r in results}) > 1
    lines = []
    for group in _groups(results):
        names = results[0].group_tasks(group)
        header = (f"{'strategy':<30}" + "".join(f"{t:>25}" for t in names)
                  + f"{'mean':>25}{'calls':>7}{'canv/call':>10}{'tok/call':>9}{'tok/s':>8}")
        lines += [f"{group} tasks", header, "-" * len(header)]
        for r in results:
            label = f"{r.strategy} [{r.model}]" if several else r.strategy
            calls = sum(r.calls[t] for t in names)
            lines.append(f"{label:<30}" + "".join(f"{cell(r.accuracy[t], r.interval[t]):>25}" for t in names)
                         + f"{cell(r.group_accuracy(group), r.group_interval(group)):>25}{calls / len(names):>7.1f}"
                         + f"{sum(r.canvases[t] for t in names) / calls:>10.2f}{r.group_tokens_per_call(group):>9.2f}"
                         + f"{r.tokens_per_second:>8.0f}")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[StrategyResult], path: Path) -> bool:
    """One panel per task group: mean accuracy (with its 95% interval) against answer
    positions per model call, one line per strategy family (and model); each panel's
    accuracy axis starts where its data spreads. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not results:
        raise ValueError("plot: no results to draw")
    groups = _groups(results)
    figure, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5.5), squeeze=False)
    first_model = results[0].model
    colours = plt.get_cmap("tab20")  # more lines than tab10's ten colours
    for axis, group in zip(axes[0], groups):
        colour_of: dict[str, int] = {}
        lines: dict[str, list[StrategyResult]] = {}
        for r in results:
            label = r.family if r.model == first_model else f"{r.family} ({r.model})"
            lines.setdefault(label, []).append(r)
        placed: dict[tuple[float, float], int] = {}  # labels already at a point (lines can share one)
        for label, members in lines.items():
            members = sorted(members, key=lambda r: r.group_tokens_per_call(group))
            x = [r.group_tokens_per_call(group) for r in members]
            y = [r.group_accuracy(group) for r in members]
            low = [max(0.0, r.group_accuracy(group) - r.group_interval(group)[0]) for r in members]
            high = [max(0.0, r.group_interval(group)[1] - r.group_accuracy(group)) for r in members]
            dashed = members[0].model != first_model
            axis.errorbar(x, y, yerr=[low, high], marker="s" if dashed else "o", capsize=3, label=label,
                          linestyle="--" if dashed else "-", color=colours(len(colour_of) % 20))
            colour_of[label] = len(colour_of)
            if len(members) > 1:  # the settings beside each point, e.g. 0.5/0.7 for threshold
                at: dict[tuple[float, float], list[str]] = {}
                for r, tx, ty in zip(members, x, y):
                    at.setdefault((round(tx, 2), round(ty, 3)), []).append(r.strategy.split("=", 1)[-1])
                for (tx, ty), settings in at.items():
                    below = placed.get((tx, ty), 0)
                    placed[(tx, ty)] = below + 1
                    axis.annotate("/".join(settings), (tx, ty), fontsize=7, xytext=(5, -10 - 9 * below),
                                  textcoords="offset points")
        lows = [r.group_interval(group)[0] for r in results]
        highs = [r.group_interval(group)[1] for r in results]
        spread = max(highs) - min(lows)
        axis.set_ylim(max(0.0, min(lows) - 0.1 * spread - 0.005), min(1.0, max(highs) + 0.1 * spread + 0.005))
        axis.set_xscale("log", base=2)
        axis.set_xlabel("answer positions per model call")
        axis.set_ylabel("accuracy, mean over the group's tasks (95% interval)")
        axis.set_title(f"{group} tasks: {', '.join(results[0].group_tasks(group))}", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"unmask eval ({', '.join(dict.fromkeys(r.model or 'model' for r in results))}; "
                    f"{results[0].examples} examples per task)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_json(results: list[StrategyResult], path: Path) -> None:
    """One line per strategy and model: its name, arguments, family, the model, and per
    task the accuracy, its 95% interval, the model calls and canvases; per task group
    the mean accuracy and answer positions per call."""
    def row(r: StrategyResult) -> dict:
        groups = {g: {"accuracy": r.group_accuracy(g), "interval": r.group_interval(g),
                      "tokens_per_call": r.group_tokens_per_call(g)} for g in GROUPS if r.group_tasks(g)}
        return {**dataclasses.asdict(r), "family": r.family, "mean_accuracy": r.mean_accuracy,
                "mean_interval": r.mean_interval, "groups": groups}

    path.write_text("".join(json.dumps(row(r)) + "\n" for r in results))
