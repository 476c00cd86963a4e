"""Generated tasks with checkable answers, for training and evaluating small masked
diffusion models (unmask train / unmask eval).

Each task writes a prompt and an answer into a fixed layout (a prompt slot, left-padded,
and an answer slot padded with EOS, so a model must also decide where the answer ends).
The short tasks (TASKS, 8 answer positions) are the original four: addition (carries tie
each digit to the ones after it), sorting and reversal (every output position depends on
the whole input), and bracket completion (each closer must match an opener far to its
left). The long tasks (LONG_TASKS, a 24-position answer slot, answers of 12-24
characters) are where committing several positions per step hurts: 15-digit addition
(carry chains), running sums of 24 digits (24 chained additions: each output is the one
before plus a digit), a shift cipher with its key in the prompt (the control: positions
independent given the prompt), and two tasks with
many valid answers, any permutation of given letters and any balanced bracket string of a
given length, checked by a validity test: positions chosen independently of each other
pick the same letter twice or unmatched brackets.
"""

from __future__ import annotations

import dataclasses
import random

import torch

PAD, MASK, EOS = "<pad>", "<mask>", "<eos>"
SPECIALS = (PAD, MASK, EOS)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHARACTERS = "0123456789+=abcdefghijklmnopqrstuvwxyz()[]:-,"  # new characters go last: ids stay stable
# The short tasks' alphabet, a prefix of CHARACTERS: the vocabulary of a model trained on
# them alone (unmask-bundled's 46 ids; its embedding's size decides the random weights
# that seed makes, so `unmask train --long-batch-size 0` draws its starting point again).
SHORT_CHARACTERS = CHARACTERS[:CHARACTERS.index(":") + 1]
PROMPT_LENGTH = 16  # the short tasks' layout
ANSWER_LENGTH = 8
LONG_PROMPT_LENGTH = 32  # the long tasks' layout
LONG_ANSWER_LENGTH = 24
TASKS = ("add", "sort", "reverse", "brackets")
LONG_TASKS = ("add_long", "cumsum", "cipher", "permute", "balanced")
ALL_TASKS = TASKS + LONG_TASKS
MANY_ANSWERS = ("permute", "balanced")  # scored by validity, not by one expected string


def layout(task: str) -> tuple[int, int]:
    """(prompt positions, answer positions) of a task's rows."""
    if task in TASKS:
        return PROMPT_LENGTH, ANSWER_LENGTH
    if task in LONG_TASKS:
        return LONG_PROMPT_LENGTH, LONG_ANSWER_LENGTH
    raise ValueError(f"unknown task {task!r}; tasks are {ALL_TASKS}")


class CharTokenizer:
    """One id per character, after the three special tokens (pad 0, mask 1, eos 2).
    characters: CHARACTERS or a prefix of it (the ids of a character never change)."""

    def __init__(self, characters: str = CHARACTERS):
        if not CHARACTERS.startswith(characters):
            raise ValueError(f"characters must be a prefix of tasks.CHARACTERS, got {characters!r}")
        self.characters = characters
        self.vocab = list(SPECIALS) + list(characters)
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
        unknown = sorted(set(text) - set(self.characters))
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

    def answer(self, ids) -> str | None:
        """A generated answer to score: its characters up to the first EOS, or None (wrong
        whatever the task) where a PAD or MASK comes before it, which decode would drop."""
        for i in ids:
            token = self.vocab[int(i)] if 0 <= int(i) < len(self.vocab) else None
            if token == EOS:
                break
            if token is None or token in SPECIALS:
                return None
        return self.decode(ids)

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
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 8)))
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


ADD_LONG_DIGITS = 15  # 15-digit operands (zero-padded) and a 16-digit sum: a 15-long carry chain
CUMSUM_DIGITS = 24  # 24 digits in, 24 running sums out
CIPHER_TEXT = 24  # "rot" + shift + ':' + text (24) + '=' fill 30 of the 32 prompt positions


def _add_long(rng: random.Random) -> Example:
    a, b = rng.randrange(10 ** ADD_LONG_DIGITS), rng.randrange(10 ** ADD_LONG_DIGITS)
    width = ADD_LONG_DIGITS
    return Example("add_long", f"{a:0{width}d}+{b:0{width}d}=", f"{a + b:0{width + 1}d}")


def _cumsum(rng: random.Random) -> Example:
    """Multi-step arithmetic: the running sums (mod 10) of 24 digits, so output i is
    output i - 1 plus digit i: decoded one at a time, each is one addition; decoded in
    parallel, a position whose predecessor is still masked needs the whole prefix."""
    digits = [rng.randrange(10) for _ in range(CUMSUM_DIGITS)]
    sums, total = [], 0
    for d in digits:
        total = (total + d) % 10
        sums.append(str(total))
    return Example("cumsum", "cum:" + "".join(map(str, digits)) + "=", "".join(sums))


def _cipher(rng: random.Random) -> Example:
    """A shift (Caesar) cipher, the key in the prompt: each letter of the text moved on
    by 1-9 places in the alphabet. The key lookup of a random substitution table (an
    induction-style two-hop read) stayed at chance for this model size within the
    training budget in every format tried (issue 20); a shift is a table of 26 x 9 the
    MLP can learn. Positions are independent given the prompt: the control task, where
    parallel decoding should cost nothing."""
    shift = rng.randint(1, 9)
    text = "".join(rng.choice(LETTERS) for _ in range(CIPHER_TEXT))
    enciphered = "".join(LETTERS[(LETTERS.index(c) + shift) % len(LETTERS)] for c in text)
    return Example("cipher", f"rot{shift}:{text}=", enciphered)


def _permute(rng: random.Random) -> Example:
    """Any ordering of 16-24 distinct letters is right; the example carries a random one
    (training sees them all, so a model learns the set, not one order)."""
    letters = rng.sample(LETTERS, rng.randint(16, LONG_ANSWER_LENGTH))
    answer = letters[:]
    rng.shuffle(answer)
    return Example("permute", "perm:" + "".join(letters) + "=", "".join(answer))


def _balanced(rng: random.Random) -> Example:
    """Any balanced string over () and [] of the given even length (12-24) is right; the
    example carries a random one."""
    length = 2 * rng.randint(6, LONG_ANSWER_LENGTH // 2)
    stack, out = [], []
    while len(out) < length:
        remaining = length - len(out)
        if stack and (len(stack) == remaining or rng.random() < 0.5):
            out.append(")" if stack.pop() == "(" else "]")
        else:
            opener = rng.choice("([")
            stack.append(opener)
            out.append(opener)
    return Example("balanced", f"bal{length:02d}=", "".join(out))


GENERATORS = {"add": _add, "sort": _sort, "reverse": _reverse, "brackets": _brackets, "add_long": _add_long,
              "cumsum": _cumsum, "cipher": _cipher, "permute": _permute, "balanced": _balanced}


def is_balanced(text: str) -> bool:
    stack = []
    for c in text:
        if c in "([":
            stack.append(c)
        elif c in ")]":
            if not stack or {"(": ")", "[": "]"}[stack.pop()] != c:
                return False
        else:
            return False
    return not stack


def correct(example: Example, answer: str | None) -> bool:
    """Exact match, or for the tasks with many answers, validity: a permutation of the
    prompt's letters, or a balanced string of the asked length. None (an answer with a
    special token inside, CharTokenizer.answer) is wrong."""
    if answer is None:
        return False
    if example.task == "permute":
        return sorted(answer) == sorted(example.prompt[len("perm:"):-1])
    if example.task == "balanced":
        return len(answer) == int(example.prompt[3:5]) and is_balanced(answer)
    return answer == example.answer


def examples(n: int, *, seed: int, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    unknown = sorted(set(tasks) - set(GENERATORS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; tasks are {ALL_TASKS}")
    rng = random.Random(seed)
    return [GENERATORS[tasks[i % len(tasks)]](rng) for i in range(n)]


def encode_batch(batch: list[Example], tokenizer: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, P + A] in the tasks' layout (P, A) (prompt left-padded, answer EOS-padded),
    attention mask [B, L] (False on padding) and answer positions [B, L]. The examples
    must share a layout."""
    layouts = {layout(example.task) for example in batch}
    if len(layouts) != 1:
        raise ValueError(f"a batch's examples must share one layout, got {sorted(layouts)}")
    (prompt_length, answer_length), = layouts
    rows, masks = [], []
    for example in batch:
        prompt = tokenizer.encode(example.prompt)
        answer = tokenizer.encode(example.answer) + [tokenizer.eos_id] * (answer_length - len(example.answer))
        if len(prompt) > prompt_length or len(answer) > answer_length:
            raise ValueError(f"example does not fit the layout: {example}")
        pad = prompt_length - len(prompt)
        rows.append([tokenizer.pad_id] * pad + prompt + answer)
        masks.append([False] * pad + [True] * (len(prompt) + answer_length))
    ids = torch.tensor(rows, dtype=torch.int64)
    answer_positions = torch.zeros_like(ids, dtype=torch.bool)
    answer_positions[:, prompt_length:] = True
    return ids, torch.tensor(masks), answer_positions
