"""Step distillation (unmask distill): the teacher's trajectories, the trajectory-state
loss, and a whole (tiny) run."""

import json

import pytest
import torch

import unmask
from unmask import cli, distill, tasks, train


def tiny_teacher(path=None):
    config = train.TrainConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=48)
    model = unmask.DiffusionTransformer.random(train.model_config(config, tasks.CharTokenizer()), seed=0, std=0.3)
    if path is not None:
        unmask.save_pretrained(model, path)
        tasks.CharTokenizer().save(path / "tokenizer.json")
    return model


@pytest.mark.parametrize("group", [tasks.TASKS, tasks.LONG_TASKS])
def test_pool_holds_the_teachers_answers_and_commit_order(group):
    teacher = tiny_teacher()
    pool = distill.teacher_pool(teacher, group, 3, seed=5, batch=2)
    prompt_length, answer_length = tasks.layout(group[0])
    assert pool.ids.shape == (3 * len(group), prompt_length + answer_length)
    assert (pool.order[:, :prompt_length] == -1).all()
    ranks = pool.order[:, prompt_length:].sort(dim=1).values
    assert torch.equal(ranks, torch.arange(answer_length).expand_as(ranks))  # one position per step
    ids, mask, _ = tasks.encode_batch(tasks.examples(3, seed=5, tasks=group[:1]), tasks.CharTokenizer())
    out = unmask.generate(teacher, ids[:, :prompt_length], attention_mask=mask[:, :prompt_length],
                          gen_length=answer_length, block_length=answer_length, steps=answer_length, stop_at_eos=False)
    assert torch.equal(pool.ids[:3], out.sequences)
    assert pool.task_names == group and torch.equal(pool.task, torch.arange(len(group)).repeat_interleave(3))


def test_a_recurring_prompt_keeps_one_trajectory():
    teacher = tiny_teacher()
    pool = distill.teacher_pool(teacher, ("balanced",), 40, seed=5, batch=7)  # 7 distinct prompts, 40 rows
    answers = {}
    for row in pool.ids.tolist():
        answers.setdefault(tuple(row[:tasks.LONG_PROMPT_LENGTH]), set()).add(tuple(row[tasks.LONG_PROMPT_LENGTH:]))
    assert len(answers) <= 7 and all(len(a) == 1 for a in answers.values())
    assert pool.ids.shape[0] == 40  # every row kept: the task keeps its share of the batches


def uniform_student_loss(pool, *, entropy_weight=0.0, random_orders=0.0):
    """distill_loss over every pool row, K = 4, for a student with uniform logits, and the
    canvases it was shown (the mask token where a position is hidden)."""
    seen = []
    vocab = len(tasks.CharTokenizer().vocab)

    class Uniform(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            seen.append(x.clone())
            return torch.zeros(*x.shape, vocab)

    loss = distill.distill_loss(Uniform(), pool, torch.arange(len(pool.ids)), 4, tasks.CharTokenizer().mask_id,
                                entropy_weight, torch.Generator().manual_seed(1), random_orders=random_orders)
    return loss, seen[0]


def test_loss_hides_the_teachers_later_positions_in_multiples_of_k():
    teacher = tiny_teacher()
    pool = distill.teacher_pool(teacher, tasks.LONG_TASKS[:1], 16, seed=5)
    loss, canvases = uniform_student_loss(pool)
    vocab = len(tasks.CharTokenizer().vocab)
    torch.testing.assert_close(loss, torch.log(torch.tensor(float(vocab))))  # CE of uniform logits
    hidden = canvases == tasks.CharTokenizer().mask_id
    revealed = (~hidden & (pool.order >= 0)).sum(dim=1)
    assert (revealed % 4 == 0).all() and (revealed < tasks.LONG_ANSWER_LENGTH).all() and len(set(revealed.tolist())) > 1
    for row in range(16):  # the revealed positions are the first ones of the teacher's order
        assert (pool.order[row][hidden[row]] >= revealed[row]).all()
    # The entropy term adds only where the student is right.
    with_entropy, _ = uniform_student_loss(pool, entropy_weight=1.0)
    assert with_entropy >= loss


def test_random_orders_reveal_other_positions_than_the_teachers_first():
    """random_orders=1: every row reveals r = K * j positions of a random order of its answer
    (a permutation of the answer's ranks), so some rows reveal positions the teacher
    committed late; the prompt is never hidden."""
    teacher = tiny_teacher()
    pool = distill.teacher_pool(teacher, tasks.LONG_TASKS[:1], 16, seed=5)
    ranks = distill.random_order(pool.order, torch.Generator().manual_seed(3))
    assert torch.equal(ranks < 0, pool.order < 0)
    answer = tasks.LONG_ANSWER_LENGTH
    assert all(sorted(row[row >= 0].tolist()) == list(range(answer)) for row in ranks)
    _, canvases = uniform_student_loss(pool, random_orders=1.0)
    hidden = canvases == tasks.CharTokenizer().mask_id
    assert not hidden[pool.order < 0].any()
    revealed = (~hidden & (pool.order >= 0)).sum(dim=1)
    assert (revealed % 4 == 0).all() and (revealed < answer).all()
    off_order = [row for row in range(16) if revealed[row] > 0
                 and (pool.order[row][~hidden[row] & (pool.order[row] >= 0)] >= revealed[row]).any()]
    assert off_order, "a random order reveals some position the teacher committed after the first r"


def test_a_tiny_distillation_runs_and_saves_a_student(tmp_path):
    tiny_teacher(tmp_path / "teacher")
    config = distill.DistillConfig(steps=3, batch_size=4, long_batch_size=4, prompts_per_task=4, checkpoint_every=2)
    student = distill.distill(tmp_path / "teacher", tmp_path / "student", config, progress=False)
    result = json.loads((tmp_path / "student" / "distill_result.json").read_text())
    assert result["steps"] == 3 and set(result["accuracy"]["steps=answer/4"]) == set(tasks.ALL_TASKS)
    loaded = unmask.from_pretrained(tmp_path / "student")
    for (name, a), (_, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    teacher = unmask.from_pretrained(tmp_path / "teacher")
    assert any(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="tokens_per_step"):
        distill.distill(tmp_path / "teacher", tmp_path / "bad", distill.DistillConfig(tokens_per_step=3))
    with pytest.raises(ValueError, match="random_orders"):
        distill.distill(tmp_path / "teacher", tmp_path / "bad", distill.DistillConfig(random_orders=1.5))


def test_task_weights_draw_a_task_in_proportion():
    pool = distill.teacher_pool(tiny_teacher(), tasks.LONG_TASKS, 3, seed=5, batch=8)
    # No weight other than 1: the uniform draw of the runs before weights existed, to the bit.
    for weights in ({}, {"cumsum": 1.0}):
        drawn = pool.draw(64, weights, torch.Generator().manual_seed(2))
        assert torch.equal(drawn, torch.randint(0, len(pool.ids), (64,), generator=torch.Generator().manual_seed(2)))
    drawn = pool.draw(8000, {"cumsum": 4.0}, torch.Generator().manual_seed(2))
    share = (pool.task[drawn] == tasks.LONG_TASKS.index("cumsum")).float().mean()
    assert abs(float(share) - 4 / 8) < 0.03  # weights 1, 4, 1, 1, 1 over equal-sized tasks
    others = pool.task[drawn][pool.task[drawn] != tasks.LONG_TASKS.index("cumsum")]
    assert len(others.unique()) == 4, "the tasks not named are still drawn"


@pytest.mark.parametrize("weights,error,match", [
    ({"nope": 2.0}, ValueError, "task_weights must be one of"),
    ({"cumsum": 0.0}, ValueError, r"task_weights\['cumsum'\] must be > 0"),
    ({"cumsum": float("inf")}, ValueError, "must be finite"),
    ({"cumsum": "2"}, TypeError, r"task_weights\['cumsum'\] must be a float"),
    ([("cumsum", 2.0)], TypeError, "task_weights must be a dict"),
])
def test_task_weights_are_checked(tmp_path, weights, error, match):
    with pytest.raises(error, match=match):
        distill.distill(tmp_path / "teacher", tmp_path / "bad", distill.DistillConfig(task_weights=weights))
    assert not (tmp_path / "bad").exists()


def test_task_weight_argument():
    assert cli._task_weight("cumsum=2") == ("cumsum", 2.0)
    for text in ("cumsum", "cumsum=two"):
        with pytest.raises(Exception, match="expected TASK=WEIGHT"):
            cli._task_weight(text)
    with pytest.raises(SystemExit):
        cli.main(["distill", "--out", "x", "--task-weight", "cumsum"])


def test_bundled_model_names_resolve():
    assert cli.model_path("unmask-bundled") == cli.default_model_path()
    assert cli.model_path("unmask-long-k4").name == "long_model_k4"
    assert cli.model_path("/some/dir").name == "dir" and cli.model_name("/some/dir") == "dir"
    assert cli.model_name("unmask-long-k4") == "unmask-long-k4"
