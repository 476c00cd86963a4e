"""`unmask eval`: exact-match accuracy, NFE and speed of every decoding strategy on
unmask.tasks, as a table (and a PNG plot with matplotlib)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from unmask import tasks
from unmask.sampler import generate


@dataclasses.dataclass
class StrategyResult:
    strategy: str
    kwargs: dict
    accuracy: dict[str, float]
    nfe: float  # model calls per generation (a batch shares them)
    tokens_per_step: float
    tokens_per_second: float

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


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
def evaluate(model, *, n_per_task: int = 256, seed: int = 1_000_003) -> list[StrategyResult]:
    tokenizer = tasks.CharTokenizer()
    data = {task: tasks.examples(n_per_task, seed=seed, tasks=(task,)) for task in tasks.TASKS}
    encoded = {task: tasks.encode_batch(batch, tokenizer) for task, batch in data.items()}
    results = []
    for name, kwargs in strategies():
        accuracy, nfe, seconds, tokens = {}, 0, 0.0, 0
        for task, (ids, mask, _) in encoded.items():
            started = time.perf_counter()
            out = generate(model, ids[:, :tasks.PROMPT_LENGTH], attention_mask=mask[:, :tasks.PROMPT_LENGTH],
                           gen_length=tasks.ANSWER_LENGTH, block_length=tasks.ANSWER_LENGTH, stop_at_eos=False,
                           **kwargs)
            seconds += time.perf_counter() - started
            answers = [tokenizer.decode(row) for row in out.tokens.tolist()]
            accuracy[task] = sum(a == e.answer for a, e in zip(answers, data[task])) / n_per_task
            nfe += out.nfe
            tokens += out.tokens.numel()
        mean_nfe = nfe / len(encoded)
        results.append(StrategyResult(name, kwargs, accuracy, mean_nfe, tasks.ANSWER_LENGTH / mean_nfe,
                                      tokens / seconds))
    return results


def format_table(results: list[StrategyResult]) -> str:
    header = f"{'strategy':<34}" + "".join(f"{t:>10}" for t in tasks.TASKS) + f"{'mean':>8}{'NFE':>7}{'tok/step':>9}{'tok/s':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.strategy:<34}" + "".join(f"{r.accuracy[t]:>10.1%}" for t in tasks.TASKS)
                     + f"{r.mean_accuracy:>8.1%}{r.nfe:>7.1f}{r.tokens_per_step:>9.2f}{r.tokens_per_second:>9.0f}")
    return "\n".join(lines)


def plot(results: list[StrategyResult], path: Path) -> bool:
    """Accuracy against tokens per step; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        axis.scatter(r.tokens_per_step, r.mean_accuracy)
        axis.annotate(r.strategy, (r.tokens_per_step, r.mean_accuracy), fontsize=7, xytext=(4, 2),
                      textcoords="offset points")
    axis.set_xlabel("tokens committed per step (gen_length / NFE)")
    axis.set_ylabel("exact-match accuracy (mean over tasks)")
    axis.set_title("unmask eval: accuracy against parallelism")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_json(results: list[StrategyResult], path: Path) -> None:
    path.write_text("".join(json.dumps({**dataclasses.asdict(r), "mean_accuracy": r.mean_accuracy}) + "\n"
                            for r in results))
