"""Generated tasks with exactly checkable answers, for training and evaluating small
masked diffusion models (unmask train / unmask eval).

Each task writes a prompt and an answer of at most ANSWER_LENGTH characters; the
answer slot is padded with EOS, so a model must also decide where the answer ends.
The tasks stress what parallel decoding gets wrong: addition (carries tie each digit
to the ones after it), sorting and reversal (every output position depends on the
whole input), and bracket completion (each closer must match an opener far to its left).
"""

from __future__ import annotations

import dataclasses
import random

import torch

PAD, MASK, EOS = "<pad>", "<mask>", "<eos>"
SPECIALS = (PAD, MASK, EOS)
CHARACTERS = "0123456789+=abcdefghijklmnopqrstuvwxyz()[]:"
PROMPT_LENGTH = 16
ANSWER_LENGTH = 8
TASKS = ("add", "sort", "reverse", "brackets")


class CharTokenizer:
    """One id per character, after the three special tokens (pad 0, mask 1, eos 2)."""

    def __init__(self):
        self.vocab = list(SPECIALS) + list(CHARACTERS)
        self.ids = {token: i for i, token in enumerate(self.vocab)}

    @property
    def mask_id(self) -> int:
        return self.ids[MASK]

    @property
    def eos_id(self) -> int:
        return self.ids[EOS]

    @property
    def pad_id(self) -> int:
        return self.ids[PAD]

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(CHARACTERS))
        if unknown:
            raise ValueError(f"text has characters outside the task alphabet: {unknown}")
        return [self.ids[c] for c in text]

    def decode(self, ids) -> str:
        """Characters up to the first EOS; special tokens are dropped."""
        out = []
        for i in ids:
            token = self.vocab[int(i)] if 0 <= int(i) < len(self.vocab) else "?"
            if token == EOS:
                break
            if token not in SPECIALS:
                out.append(token)
        return "".join(out)

    def save(self, path) -> None:
        """tokenizer.json for the tokenizers library: one token per character."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(self.vocab)}, unk_token=PAD))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        tokenizer.add_special_tokens(list(SPECIALS))
        tokenizer.save(str(path))


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _add(rng: random.Random) -> Example:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return Example("add", f"{a}+{b}=", str(a + b))


def _sort(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 8)))
    return Example("sort", f"sort:{digits}=", "".join(sorted(digits)))


def _reverse(rng: random.Random) -> Example:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 8)))
    return Example("reverse", f"rev:{word}=", word[::-1])


def _brackets(rng: random.Random) -> Example:
    """A prefix of a balanced sequence over () and []; the answer closes it."""
    stack, prefix = [], []
    length = rng.randint(4, 10)
    while len(prefix) < length:
        if stack and (rng.random() < 0.4 or len(stack) >= ANSWER_LENGTH):
            prefix.append(")" if stack.pop() == "(" else "]")
        else:
            opener = rng.choice("([")
            stack.append(opener)
            prefix.append(opener)
    if not stack:
        stack.append("(")
        prefix.append("(")
    closing = "".join(")" if o == "(" else "]" for o in reversed(stack))
    return Example("brackets", "".join(prefix) + "=", closing)


GENERATORS = {"add": _add, "sort": _sort, "reverse": _reverse, "brackets": _brackets}


def examples(n: int, *, seed: int, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    rng = random.Random(seed)
    return [GENERATORS[tasks[i % len(tasks)]](rng) for i in range(n)]


def encode_batch(batch: list[Example], tokenizer: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, PROMPT_LENGTH + ANSWER_LENGTH] (prompt left-padded, answer EOS-padded),
    attention mask [B, L] (False on padding) and answer positions [B, L]."""
    rows, masks = [], []
    for example in batch:
        prompt = tokenizer.encode(example.prompt)
        answer = tokenizer.encode(example.answer) + [tokenizer.eos_id] * (ANSWER_LENGTH - len(example.answer))
        if len(prompt) > PROMPT_LENGTH or len(answer) > ANSWER_LENGTH:
            raise ValueError(f"example does not fit the layout: {example}")
        pad = PROMPT_LENGTH - len(prompt)
        rows.append([tokenizer.pad_id] * pad + prompt + answer)
        masks.append([False] * pad + [True] * (len(prompt) + ANSWER_LENGTH))
    ids = torch.tensor(rows, dtype=torch.int64)
    answer_positions = torch.zeros_like(ids, dtype=torch.bool)
    answer_positions[:, PROMPT_LENGTH:] = True
    return ids, torch.tensor(masks), answer_positions
