"""The steps rule's schedules (unmask.schedule): LLaDA's even split, and Dream's time
schedule, against Dream's generation loop as its paper and code describe it (a greedy
transcription here, written from the algorithm: timesteps linspace(1, eps, steps + 1),
int(m * (1 - s / t)) tokens at each step, all that is left at the last)."""

import numpy as np
import pytest
import torch

import unmask
from unmask import schedule
from tests.helpers import tiny_model

MASK = 60


@pytest.mark.parametrize("steps", [1, 2, 7, 8, 32, 100, 255, 256, 512, 1000])
def test_dream_timesteps_are_torch_linspace_bit_for_bit(steps):
    for eps in (1e-3, 1e-2, 0.1):
        assert np.array_equal(schedule.dream_timesteps(steps, eps), torch.linspace(1, eps, steps + 1).numpy())


def dream_counts_with_torch(masked: int, steps: int, eps: float = 1e-3) -> list[int]:
    timesteps, left, counts = torch.linspace(1, eps, steps + 1), masked, []
    for i in range(steps):
        t, s = timesteps[i], timesteps[i + 1]
        average = torch.tensor([left] * 3).sum() / 3  # Dream's per-row average, float32
        count = int(average * (1 - s / t)) if i < steps - 1 else int(average)
        counts.append(count)
        left -= count
    return counts


@pytest.mark.parametrize("masked,steps", [(32, 32), (32, 8), (32, 5), (256, 256), (256, 64), (7, 13), (1, 1),
                                          (100, 3), (512, 511)])
def test_dream_counts_follow_dreams_float32_arithmetic(masked, steps):
    assert schedule.dream_counts([masked], steps)[0] == dream_counts_with_torch(masked, steps)


def test_step_counts_leave_out_steps_where_no_row_commits():
    dream = schedule.dream_counts([32, 5], 32)
    plan = schedule.step_counts([32, 5], 32, "dream")
    assert [sum(row) for row in plan] == [32, 5]
    assert all(any(row[i] for row in plan) for i in range(len(plan[0])))
    assert len(plan[0]) == sum(1 for i in range(32) if dream[0][i] or dream[1][i]) < 32  # its first step commits none
    assert schedule.step_counts([10], 4) == schedule.schedule_counts([10], 4) == [[3, 3, 2, 2]]


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's top-p filter: logits outside the smallest most-likely set whose probability
    exceeds top_p become -inf (the token that crosses it stays)."""
    ordered, order = torch.sort(logits, descending=True)
    beyond = torch.softmax(ordered, dim=-1).cumsum(dim=-1) > top_p
    beyond = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], dim=-1)  # keep the crossing one
    return logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))


def dream_greedy(model, prompts: list[list[int]], gen_length: int, steps: int, top_p: float | None = None):
    """Dream's generation loop, greedy (temperature 0, no top-k), confidence the top
    probability over what top-p keeps: every step runs the model, takes each mask's most
    likely token (never the mask itself, as unmask's sampler bans it) and commits the
    int(m (1 - s/t)) most confident, per row."""
    x = torch.cat([torch.tensor(prompts), torch.full((len(prompts), gen_length), MASK)], dim=1)
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    rows = torch.arange(len(prompts))[:, None]
    with torch.no_grad():
        for i in range(steps):
            masked = x == MASK
            logits = model(x).float()
            logits[..., MASK] = float("-inf")
            if top_p is not None:
                logits = nucleus(logits, top_p)
            confidence, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
            left = masked.sum() / masked.shape[0]
            count = int(left * (1 - timesteps[i + 1] / timesteps[i])) if i < steps - 1 else int(left)
            if count > 0:
                chosen = torch.topk(torch.where(masked, confidence, float("-inf")), count).indices
                x[rows, chosen] = tokens[rows, chosen]
    return x[:, len(prompts[0]):]


@pytest.mark.parametrize("top_p", [None, 0.9, 0.5])
@pytest.mark.parametrize("steps", [16, 8, 5])
def test_generate_with_the_dream_schedule_decodes_as_dreams_loop(steps, top_p):
    # top_p as Dream's Instruct settings use it (0.95), its confidence over what it keeps;
    # a small top_p keeps one token at many positions, whose confidences tie at 1.0, and
    # torch.topk leaves the order of ties unspecified where unmask takes the lower position.
    model = tiny_model(seed=3, model_type="dream", include_qkv_bias=True)
    prompts = [[1, 2, 3], [4, 5, 6]]
    expected = dream_greedy(model, prompts, 16, steps, top_p)
    out = unmask.generate(model, prompts, gen_length=16, block_length=16, steps=steps, schedule="dream",
                          top_p=1.0 if top_p is None else top_p, stop_at_eos=False)
    assert torch.equal(out.tokens, expected)
    assert out.nfe == sum(1 for count in schedule.dream_counts([16], steps)[0] if count)
    llada = unmask.generate(model, prompts, gen_length=16, block_length=16, steps=steps, stop_at_eos=False)
    assert not torch.equal(llada.tokens, expected)  # the schedules differ on these cases


def test_the_dream_schedule_is_refused_where_it_does_not_apply():
    model = tiny_model()
    with pytest.raises(ValueError, match="schedule='dream' spreads the steps rule's commits"):
        unmask.generate(model, [[1, 2]], gen_length=8, block_length=8, threshold=0.5, schedule="dream")
    with pytest.raises(ValueError, match="schedule"):
        unmask.generate(model, [[1, 2]], gen_length=8, block_length=8, schedule="cosine")
    with pytest.raises(ValueError, match="takes at most 65536"):
        unmask.generate(model, [[1, 2]], gen_length=8, block_length=8, steps=10**9, schedule="dream")


def test_infill_plans_each_rows_dream_schedule_from_its_own_masks():
    # Rows with 6 and 5 masks: each row's counts come from its own (Dream averages over its
    # batch), so a row decodes in a batch as alone.
    model = tiny_model(seed=6, std=1.0)
    m = model.mask_id
    ids = torch.tensor([[3, m, 4, m, m, m, m, m], [m, m, m, m, 9, 9, 9, m]])
    together = unmask.infill(model, ids, schedule="dream", steps=8).tokens
    for row in range(2):
        alone = unmask.infill(model, ids[row:row + 1], schedule="dream", steps=8).tokens
        assert torch.equal(together[row], alone[0])
    assert schedule.dream_counts([6, 5], 8) == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1, 1, 2]]
