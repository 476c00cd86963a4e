"""Tasks, the diffusion training objective, training resumption, evaluation, and the
bundled model (unmask train / unmask eval)."""

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
    assert "steps=8" in names and "threshold=0.9" in names and "factor=1.0" in names
    assert any("remasking=random" in n for n in names)
    assert all(0 <= r.mean_accuracy <= 1 and r.nfe >= 1 for r in results)
    by_name = {r.strategy: r for r in results}
    speculative = by_name["steps=8 speculate=8"]  # the answers of steps=8, in no more calls
    assert speculative.accuracy == by_name["steps=8"].accuracy and speculative.nfe <= by_name["steps=8"].nfe
    assert "mean" in evaluate.format_table(results)
    families = {r.family for r in results}
    assert {"steps", "threshold", "factor", "speculative", "steps, random"} <= families
    for r in results:
        for task, (low, high) in r.interval.items():
            assert low <= r.accuracy[task] <= high and r.calls[task] >= 1


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
    assert all(r["model"] == "tiny" and set(r["accuracy"]) == set(tasks.TASKS) for r in rows)
    assert evaluate.plot(results, tmp_path / "eval.png") and (tmp_path / "eval.png").stat().st_size > 1000


bundled = cli.default_model_path()


@pytest.mark.skipif(not (bundled / "config.json").exists(), reason="no bundled model in this tree")
def test_bundled_model_is_small_and_accurate():
    size = sum(f.stat().st_size for f in bundled.iterdir())
    assert size < 10 * 2**20
    model = unmask.from_pretrained(bundled)
    scores = train.exact_match(model, n=64, seed=random.Random(5).randrange(10**9), steps=tasks.ANSWER_LENGTH)
    assert min(scores.values()) >= 0.9, scores  # 64 examples per task: 95% measured on 256 (README)


@pytest.mark.skipif(not (bundled / "config.json").exists(), reason="no bundled model in this tree")
def test_cli_generate_defaults_to_the_bundled_model(capsys):
    assert cli.main(["generate", "--prompt", "123+456=", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "579"
