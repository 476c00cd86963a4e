"""Can the bundled model's architecture learn one task, and how fast? A fresh model of
`unmask train`'s configuration trained on that task alone (48 rows a step, the same
diffusion loss and optimiser, a given learning rate), with a probe every 250 steps: one
answer position masked, the rest of the answer visible, the share predicted right.
Before a 45-minute `unmask train` run, this says in minutes whether a task leaves chance
at all (issue 20: cumsum leaves it at lr 5e-4 by step ~750, never at 2e-3).

    python bench/task_probe.py --task cumsum [--minutes 6] [--learning-rate 5e-4] [--digits N]

Prints JSON lines. Chance, for reading them: cipher fills its 24 answer positions with
letters (chance 1/26), cumsum with digits (chance 0.1); where an answer is shorter, its
EOS padding is always right and raises the floor.
"""

import argparse
import json
import time

import torch

from unmask import tasks
from unmask.models import DiffusionTransformer
from unmask.train import TrainConfig, diffusion_loss, learning_rate, model_config

ROWS = 48


def one_masked_accuracy(model, task: str, tokenizer, rounds: int = 4) -> float:
    """Share of single masked answer positions predicted right, the rest of the answer shown."""
    model.eval()
    examples = tasks.examples(64, seed=999, tasks=(task,))
    ids, mask, answers = tasks.encode_batch(examples, tokenizer)
    generator = torch.Generator().manual_seed(1)
    right = total = 0
    with torch.no_grad():
        for _ in range(rounds):
            pick = torch.zeros_like(answers)
            for r in range(ids.shape[0]):
                columns = answers[r].nonzero().flatten()
                pick[r, columns[torch.randint(len(columns), (1,), generator=generator)]] = True
            predicted = model(ids.masked_fill(pick, tokenizer.mask_id), mask).argmax(-1)
            right += (predicted[pick] == ids[pick]).sum().item()
            total += pick.sum().item()
    model.train()
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=tasks.ALL_TASKS)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--digits", type=int, help="cumsum's length (default: the task's own)")
    args = parser.parse_args()
    if args.digits is not None:
        tasks.CUMSUM_DIGITS = args.digits
    torch.manual_seed(0)
    tokenizer = tasks.CharTokenizer()
    config = TrainConfig(steps=4000, learning_rate=args.learning_rate)  # the cosine schedule's length
    model = DiffusionTransformer.random(model_config(config, tokenizer), seed=0, std=0.02).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98),
                                  weight_decay=config.weight_decay)
    started, step = time.perf_counter(), 0
    while (time.perf_counter() - started) / 60 < args.minutes:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        ids, mask, answers = tasks.encode_batch(tasks.examples(ROWS, seed=step, tasks=(args.task,)), tokenizer)
        loss = diffusion_loss(model, ids, mask, answers, tokenizer.mask_id, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0:
            print(json.dumps({"task": args.task, "learning_rate": args.learning_rate, "step": step,
                              "minutes": round((time.perf_counter() - started) / 60, 2), "loss": round(loss.item(), 3),
                              "one_masked_accuracy": round(one_masked_accuracy(model, args.task, tokenizer), 3)}),
                  flush=True)
        step += 1
    print(json.dumps({"task": args.task, "learning_rate": args.learning_rate, "steps": step,
                      "one_masked_accuracy": one_masked_accuracy(model, args.task, tokenizer)}), flush=True)


if __name__ == "__main__":
    main()
