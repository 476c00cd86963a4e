"""Tasks, the diffusion training objective, training resumption, evaluation, and the
bundled model (unmask train / unmask eval)."""

import dataclasses
import json
import random

import pytest
import torch

import unmask
from unmask import cli, evaluate, tasks, train


def test_tokenizer_round_trip_and_alphabet():
    tokenizer = tasks.CharTokenizer()
    ids = tokenizer.encode("sort:3141=")
    assert tokenizer.decode(ids + [tokenizer.eos_id, 5, 6]) == "sort:3141="
    with pytest.raises(ValueError, match="outside the task alphabet"):
        tokenizer.encode("Hello")


def balanced(text: str) -> bool:
    stack = []
    for c in text:
        if c in "([":
            stack.append(c)
        elif not stack or {"(": ")", "[": "]"}[stack.pop()] != c:
            return False
    return not stack


def test_balanced_checks_agree():
    for text in ["", "()", "([])", "(]", "((", ")(", "[()]()", "a()"]:
        assert tasks.is_balanced(text) == (balanced(text) and set(text) <= set("()[]")), text


@pytest.mark.parametrize("task", tasks.LONG_TASKS)
def test_long_answers_are_right_and_fill_the_long_layout(task):
    lengths = set()
    for example in tasks.examples(300, seed=7, tasks=(task,)):
        body = example.prompt.rstrip("=")
        if task == "add_long":
            a, b = body.split("+")
            assert len(a) == len(b) == 15 and int(example.answer) == int(a) + int(b) and len(example.answer) == 16
        elif task == "cumsum":
            digits = body.split(":")[1]
            assert len(digits) == 24 and example.answer == "".join(
                str(sum(map(int, digits[:i + 1])) % 10) for i in range(24))
        elif task == "cipher":
            key, text = body.split(":")
            shift = int(key[len("rot"):])
            assert key.startswith("rot") and 1 <= shift <= 9 and len(text) == 24
            assert example.answer == "".join(chr((ord(c) - ord("a") + shift) % 26 + ord("a")) for c in text)
        elif task == "permute":
            letters = body.split(":")[1]
            assert len(set(letters)) == len(letters) and sorted(example.answer) == sorted(letters)
        else:
            assert balanced(example.answer) and len(example.answer) == int(body[3:])
        assert tasks.correct(example, example.answer)
        assert len(example.prompt) <= tasks.LONG_PROMPT_LENGTH and len(example.answer) <= tasks.LONG_ANSWER_LENGTH
        lengths.add(len(example.answer))
    assert max(lengths) >= 16  # long answers


def test_tasks_with_many_answers_are_judged_by_validity():
    perm = tasks.Example("permute", "perm:abcd=", "dcba")
    assert tasks.correct(perm, "abcd") and tasks.correct(perm, "badc")
    assert not tasks.correct(perm, "abca") and not tasks.correct(perm, "abc") and not tasks.correct(perm, "abcde")
    bal = tasks.Example("balanced", "bal06=", "()()()")
    assert tasks.correct(bal, "([()])") and tasks.correct(bal, "[][]()")
    assert not tasks.correct(bal, "([)]()") and not tasks.correct(bal, "()()") and not tasks.correct(bal, "(((((()")
    exact = tasks.Example("cipher", "ab:ab=", "ba")
    assert tasks.correct(exact, "ba") and not tasks.correct(exact, "ab")


def test_long_layout_and_mixed_layouts_are_refused():
    tokenizer = tasks.CharTokenizer()
    ids, mask, answers = tasks.encode_batch(tasks.examples(5, seed=3, tasks=tasks.LONG_TASKS), tokenizer)
    assert ids.shape == (5, tasks.LONG_PROMPT_LENGTH + tasks.LONG_ANSWER_LENGTH)
    assert answers[:, tasks.LONG_PROMPT_LENGTH:].all() and not answers[:, :tasks.LONG_PROMPT_LENGTH].any()
    with pytest.raises(ValueError, match="one layout"):
        tasks.encode_batch(tasks.examples(2, seed=3, tasks=("add", "add_long")), tokenizer)
    with pytest.raises(ValueError, match="unknown tasks"):
        tasks.examples(2, seed=3, tasks=("nope",))
    with pytest.raises(ValueError, match="unknown task"):
        tasks.layout("nope")


@pytest.mark.parametrize("task", tasks.TASKS)
def test_answers_are_right(task):
    for example in tasks.examples(300, seed=7, tasks=(task,)):
        body = example.prompt.rstrip("=")
        if task == "add":
            a, b = body.split("+")
            assert int(example.answer) == int(a) + int(b)
        elif task == "sort":
            assert example.answer == "".join(sorted(body.split(":")[1]))
        elif task == "reverse":
            assert example.answer == body.split(":")[1][::-1]
        else:
            assert balanced(body + example.answer) and not balanced(body)
            assert all(c in ")]" for c in example.answer), "the answer only closes"
        assert len(example.prompt) <= tasks.PROMPT_LENGTH and len(example.answer) <= tasks.ANSWER_LENGTH


def test_encode_batch_layout():
    tokenizer = tasks.CharTokenizer()
    batch = [tasks.Example("add", "1+2=", "3"), tasks.Example("sort", "sort:21=", "12")]
    ids, mask, answers = tasks.encode_batch(batch, tokenizer)
    assert ids.shape == (2, tasks.PROMPT_LENGTH + tasks.ANSWER_LENGTH)
    assert tokenizer.decode(ids[0, tasks.PROMPT_LENGTH:].tolist()) == "3"
    assert mask[0].sum() == 4 + tasks.ANSWER_LENGTH and not mask[0, 0]
    assert answers[:, tasks.PROMPT_LENGTH:].all() and not answers[:, :tasks.PROMPT_LENGTH].any()


def test_loss_masks_only_answers_and_weights_by_one_over_t():
    tokenizer = tasks.CharTokenizer()
    ids, mask, answers = tasks.encode_batch(tasks.examples(16, seed=1), tokenizer)
    seen = []

    class Uniform(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            seen.append(x.clone())
            return torch.zeros(*x.shape, len(tokenizer.vocab))

    generator = torch.Generator().manual_seed(3)
    loss = train.diffusion_loss(Uniform(), ids, mask, answers, tokenizer.mask_id, generator)
    noisy = seen[0]
    masked = noisy == tokenizer.mask_id
    assert not (masked & ~answers).any(), "prompt tokens are never masked"
    # Uniform logits: each masked token costs log V; recompute the 1/t weights from the seed.
    generator = torch.Generator().manual_seed(3)
    t = 1e-3 + (1 - 1e-3) * torch.rand(16, generator=generator)
    expected = (masked.sum(1) / t).sum() * torch.log(torch.tensor(float(len(tokenizer.vocab)))) / answers.sum()
    torch.testing.assert_close(loss, expected.float())


def tiny_train_config(steps):
    return train.TrainConfig(steps=steps, batch_size=8, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=48,
                             checkpoint_every=2, warmup_steps=2)


def test_training_resumes_exactly(tmp_path):
    straight = train.train(tmp_path / "a", tiny_train_config(6), progress=False)
    train.train(tmp_path / "b", tiny_train_config(3), progress=False)
    config = tiny_train_config(6)
    resumed = train.train(tmp_path / "b", config, progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    loaded = unmask.from_pretrained(tmp_path / "a")  # the LLaDA on-disk format
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "llada"
    assert loaded.tokenizer.encode("12+3=").ids == tasks.CharTokenizer().encode("12+3=")
    assert json.loads((tmp_path / "a" / "train_result.json").read_text())["steps"] == 6
    train.train(tmp_path / "a", config, progress=False)  # finished: resumed, it takes no step
    assert json.loads((tmp_path / "a" / "train_result.json").read_text())["steps"] == 6


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be >= 1, got 0"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("long_batch_size", -1, "long_batch_size must be >= 0, got -1"),
    ("learning_rate", 0.0, "learning_rate must be > 0"),
    ("max_minutes", -1.0, "max_minutes must be > 0"),
])
def test_a_run_of_nothing_is_refused_before_anything_is_written(tmp_path, field, value, message):
    config = dataclasses.replace(tiny_train_config(2), **{field: value})
    with pytest.raises(ValueError, match=message):
        train.train(tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_short_task_run_has_the_bundled_models_vocabulary(tmp_path):
    """The short tasks write only SHORT_CHARACTERS, and a run of them alone gets that
    vocabulary: unmask-bundled's 46 ids (its embedding's size decides the weights a seed
    draws; the two characters the long tasks added had made `unmask train
    --long-batch-size 0` start elsewhere)."""
    for example in tasks.examples(4000, seed=5):
        assert set(example.prompt + example.answer) <= set(tasks.SHORT_CHARACTERS), example
    config = dataclasses.replace(tiny_train_config(1), long_batch_size=0)
    train.train(tmp_path / "short", config, progress=False)
    bundled = json.loads((cli.default_model_path() / "config.json").read_text())
    assert json.loads((tmp_path / "short" / "config.json").read_text())["vocab_size"] == bundled["vocab_size"] == 46
    train.train(tmp_path / "both", dataclasses.replace(config, long_batch_size=2), progress=False)
    assert json.loads((tmp_path / "both" / "config.json").read_text())["vocab_size"] == len(tasks.CharTokenizer().vocab)
    with pytest.raises(ValueError, match="characters must be a prefix"):
        tasks.CharTokenizer("ab")


def test_an_answer_with_a_special_token_inside_is_wrong():
    """decode drops PAD and MASK, so '5<pad>79' read as '579' used to score as right."""
    tokenizer = tasks.CharTokenizer()
    example = tasks.Example("add", "123+456=", "579")
    ids = tokenizer.encode("579") + [tokenizer.eos_id] * 5
    assert tasks.correct(example, tokenizer.answer(ids))
    for special in (tokenizer.vocab.index(tasks.PAD), tokenizer.mask_id):
        inside = ids[:1] + [special] + ids[1:7]
        assert tokenizer.decode(inside) == "579" and tokenizer.answer(inside) is None
        assert not tasks.correct(example, tokenizer.answer(inside))
    after_eos = ids[:4] + [tokenizer.mask_id] * 4
    assert tokenizer.answer(after_eos) == "579", "what follows the first EOS is not the answer"


def test_gradients_flow_through_unmask_attention():
    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    valid = torch.tensor([[True, True, False, True, True]])
    unmask.ops.attention(q, k, v, key_valid=valid, block_size=2).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    unmask.reference.attention(q, k, v, key_valid=valid, block_size=2).sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad)


def test_evaluate_covers_every_strategy():
    model = unmask.DiffusionTransformer.random(train.model_config(tiny_train_config(1), tasks.CharTokenizer()), seed=0)
    results = evaluate.evaluate(model, n_per_task=4)
    names = [r.strategy for r in results]
    assert "steps=A" in names and "threshold=0.9" in names and "factor=1.0" in names
    assert any("remasking=random" in n for n in names) and any("revise" in n for n in names)
    assert all(0 <= r.mean_accuracy <= 1 and r.nfe >= 1 for r in results)
    by_name = {r.strategy: r for r in results}
    speculative = by_name["steps=A speculate=8"]  # the answers of steps=A, in no more calls
    assert speculative.accuracy == by_name["steps=A"].accuracy and speculative.nfe <= by_name["steps=A"].nfe
    steps = by_name["steps=A/4"]  # A/4 steps: 2 calls for the short tasks, 6 for the long ones
    assert all(steps.calls[t] == tasks.layout(t)[1] // 4 for t in tasks.ALL_TASKS)
    assert steps.group_tokens_per_call("short") == steps.group_tokens_per_call("long") == 4
    assert set(results[0].accuracy) == set(tasks.ALL_TASKS)
    table = evaluate.format_table(results)
    assert "short tasks" in table and "long tasks" in table and "permute" in table
    families = {r.family for r in results}
    assert {"steps", "threshold", "factor", "speculative", "steps, random", "self-correction"} <= families
    for r in results:
        for task, (low, high) in r.interval.items():
            assert low <= r.accuracy[task] <= high and r.canvases[task] >= r.calls[task] >= 1
    student = evaluate.evaluate(model, n_per_task=2, strategy_set="student", task_names=("add", "permute"))
    assert {r.family for r in student} == {"steps", "threshold", "self-correction"}
    with pytest.raises(ValueError, match="strategy_set"):
        evaluate.strategies("nope")


def test_wilson_interval():
    assert evaluate.wilson_interval(0, 10)[0] == 0.0 and evaluate.wilson_interval(0, 10)[1] > 0.2
    low, high = evaluate.wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3  # the textbook values
    assert evaluate.wilson_interval(100, 100)[1] == 1.0 and evaluate.wilson_interval(100, 100)[0] > 0.96
    for n in range(1, 40):  # exact at the ends, whatever the rounding
        assert evaluate.wilson_interval(n, n)[1] == 1.0 and evaluate.wilson_interval(0, n)[0] == 0.0


def test_eval_writes_json_lines_and_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = unmask.DiffusionTransformer.random(train.model_config(tiny_train_config(1), tasks.CharTokenizer()), seed=0)
    results = evaluate.evaluate(model, n_per_task=4, model_name="tiny")
    evaluate.write_json(results, tmp_path / "eval.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in rows] == [r.strategy for r in results]
    assert all(r["model"] == "tiny" and set(r["accuracy"]) == set(tasks.ALL_TASKS) for r in rows)
    assert all(set(r["groups"]) == {"short", "long"} for r in rows)
    assert evaluate.plot(results, tmp_path / "eval.png") and (tmp_path / "eval.png").stat().st_size > 1000


bundled = cli.default_model_path()


@pytest.mark.skipif(not (bundled / "config.json").exists(), reason="no bundled model in this tree")
def test_bundled_model_is_small_and_accurate():
    size = sum(f.stat().st_size for f in bundled.iterdir())
    assert size < 10 * 2**20
    model = unmask.from_pretrained(bundled)
    scores = train.exact_match(model, n=64, seed=random.Random(5).randrange(10**9), task_names=tasks.TASKS)
    assert min(scores.values()) >= 0.9, scores  # 64 examples per task: 95% measured on 256 (README)


# Floors some 2 standard deviations of 64 examples below the accuracy measured on 256
# (README, The bundled models): the tasks a model learnt, not the ones it did not.
# (model, generate's rule, floors per task)
LONG_MODEL_FLOORS = [
    ("unmask-long", {}, {"add": 0.4, "sort": 0.9, "reverse": 0.9, "brackets": 0.9, "add_long": 0.9, "balanced": 0.65}),
    # The student with threshold decoding: balanced in one call (README).
    ("unmask-long-k4", {"threshold": 0.5}, {"sort": 0.9, "reverse": 0.9, "brackets": 0.9, "add_long": 0.9,
                                            "balanced": 0.65}),
    # What distillation bought (README, The trade-off): at 4 tokens per step (6 calls for
    # 24 positions) 100% and 100% on 256 examples, where the teacher at the same calls
    # gets 66.4% and 14.1%, so these floors fail on an undistilled model.
    ("unmask-long-k4", {"steps": tasks.LONG_ANSWER_LENGTH // 4}, {"cumsum": 0.9, "balanced": 0.9}),
]


@pytest.mark.parametrize("name,rule,floors", LONG_MODEL_FLOORS)
def test_long_models_are_small_and_keep_what_they_learnt(name, rule, floors):
    path = cli.model_path(name)
    if not (path / "config.json").exists():
        pytest.skip(f"no {name} in this tree")
    assert sum(f.stat().st_size for f in path.iterdir()) < 10 * 2**20
    model = unmask.from_pretrained(path)
    seed = random.Random(6).randrange(10**9)
    scores = train.exact_match(model, n=64, seed=seed, task_names=tuple(floors), **rule)
    assert all(scores[task] >= floor for task, floor in floors.items()), scores
