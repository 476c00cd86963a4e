"""Tensor parallelism for the unmask model over torch.distributed (a DeviceMesh).

Megatron-style sharding through PyTorch's own tensor-parallel API
(torch.distributed.tensor.parallel.parallelize_module), so it runs wherever
torch.distributed does: NCCL on GPUs, gloo on CPUs.

- q, k, v projections and the MLP's gate and up projections are split by output
  columns (each rank holds a contiguous slice of the heads and of the MLP hidden
  units); o_proj and down_proj are split by input rows, so each rank's partial sum is
  completed by one all-reduce after attention and one after the MLP.
- A mixture-of-experts layer (LLaDA 2.0) splits each routed expert's hidden units the
  same way (its stacked weights as DTensors sharded along them) and its shared experts
  as the dense MLP; every rank routes every token, and one float32 all-reduce sums the
  routed outputs. Inference only: the experts' slices take no gradient (the manual
  all-reduce is not differentiated).
- The LM head is split over the vocabulary and its logits stay split: each rank
  samples and scores its vocabulary shard (shard_statistics) and an all-gather of a
  few float64 numbers per row picks the winner (combine_statistics). The token and
  its confidence are the single-device ones (the RNG draw of id i does not depend on
  which rank holds i), and full logits are never gathered, except for top_k / top_p,
  whose kept set depends on the whole row: those gather the rows' logits and sample
  them with unmask.ops.sample (exact, and rare in diffusion decoding).
- Embeddings and norms are replicated.

    torchrun --nproc-per-node 8 -m unmask generate --model DIR --prompt TEXT

or in a script launched by torchrun:

    mesh = unmask.distributed.init()
    model = unmask.distributed.tensor_parallel(unmask.from_pretrained(DIR, dtype=torch.bfloat16), mesh)
    out = unmask.generate(model, prompts, ...)   # every rank gets the same tokens
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from unmask import ops, reference, rng, validation
from unmask.models.transformer import local_share

# Columns of the per-row statistics one rank computes over its vocabulary shard.
STAT_MAX, STAT_BEST, STAT_BEST_ID, STAT_BEST_LOGIT, STAT_SECOND, STAT_SUM, STAT_WEIGHTED, STAT_BAD = range(8)
N_STATS = 8

# Split by output columns (then the row-split projection after them sums the shares).
ATTENTION_COLUMN_SPLIT, MLP_COLUMN_SPLIT = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def launched_world_size() -> int:
    """The number of processes torchrun (or another launcher) started, 1 when run alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str | None = None):
    """Join the process group a launcher such as torchrun set up; returns a 1-D DeviceMesh
    named "tp" over every rank. NCCL with one GPU per rank (cuda:LOCAL_RANK) where CUDA
    is available, gloo on CPUs."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return init_device_mesh(device_type, (launched_world_size(),), mesh_dim_names=("tp",))


def shutdown(*, wait_for_others: bool = True) -> None:
    """Leave the process group: a barrier first, so no rank tears down its connections
    while another still uses them (gloo otherwise aborts with "terminate called
    without an active exception"), then destroy_process_group. wait_for_others=False
    (a rank leaving on an error): no barrier, which the other ranks, failed or waiting in
    a collective this one will never join, might never reach; torchrun then stops them."""
    if wait_for_others:
        dist.barrier()
    dist.destroy_process_group()


def check_vocab_split(vocab: int, world: int) -> None:
    """Every rank gets some of the vocabulary: the LM head is split as torch shards a
    dimension, ceil(vocab / world) ids per rank and the last ranks what is left, which
    can be nothing (17 ids over 8 ranks: 3, 3, 3, 3, 3, 2, 0, 0). A rank with no ids
    fails in its sampler while the others wait for it in a collective, forever."""
    chunk = -(-vocab // world)
    if (world - 1) * chunk >= vocab:
        raise ValueError(f"config.embedding_size={vocab} split over {world} ranks in chunks of {chunk} ids (torch's "
                         f"sharding) leaves the last rank without any; use fewer ranks")


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """The slice [start, start + size) of a vocabulary of `vocab` ids that this rank's LM
    head computes; `sizes` lists every rank's slice length in rank order."""

    start: int
    size: int
    vocab: int
    sizes: tuple[int, ...]
    group: dist.ProcessGroup

    def sample(self, logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               banned=None, confidence: str = "prob", conf_temperature: float = 1.0, seed: int = 0,
               offset: int | torch.Tensor = 0, rows: torch.Tensor | None = None,
               check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """unmask.ops.sample over logits split by vocabulary: logits [..., size] hold this
        rank's ids; every rank returns the same tokens (global ids) and confidences.
        Arguments are checked as unmask.ops.sample checks them (banned ids against the
        whole vocabulary)."""
        call = validation.sample_call(logits, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned,
                                      confidence=confidence, conf_temperature=conf_temperature, seed=seed,
                                      offset=offset, rows=rows, check=check, vocab=self.vocab)
        if logits.shape[-1] != self.size:
            raise ValueError(f"logits must hold this rank's {self.size} vocabulary ids, got shape {tuple(logits.shape)}")
        o = call.options
        if (0 < o.top_k < self.vocab) or o.top_p < 1.0:
            full = self.gather(logits)
            return ops.sample(full, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, banned=call.banned,
                              confidence=o.confidence, conf_temperature=o.conf_temperature, seed=o.seed,
                              offset=o.offset, rows=call.rows, check=check)
        lead = logits.shape[:-1]
        flat = logits.reshape(-1, self.size)
        row_ids = torch.arange(flat.shape[0], device=flat.device) if call.rows is None else call.rows
        if call.rows is not None:  # ids outside [0, N) are skipped, as every kernel skips or refuses them
            row_ids = row_ids[(row_ids >= 0) & (row_ids < flat.shape[0])]
        offset = o.offset
        if isinstance(offset, torch.Tensor) and offset.dim() > 0:  # one offset per row
            offset = offset.reshape(-1)[row_ids]
        stats = shard_statistics(flat[row_ids], row_ids, self.start, banned=call.banned, temperature=o.temperature,
                                 conf_temperature=o.conf_temperature, seed=o.seed, offset=offset)
        everyone = [torch.empty_like(stats) for _ in self.sizes]
        dist.all_gather(everyone, stats, group=self.group)
        tokens, conf = combine_statistics(torch.stack(everyone), row_ids, confidence=o.confidence,
                                          temperature=o.temperature, conf_temperature=o.conf_temperature,
                                          seed=o.seed, offset=offset)
        all_tokens = torch.full((flat.shape[0],), -1, dtype=torch.int64, device=flat.device)
        all_conf = torch.full((flat.shape[0],), float("-inf"), dtype=torch.float32, device=flat.device)
        all_tokens[row_ids] = tokens
        all_conf[row_ids] = conf
        if check:
            ops.raise_on_invalid_rows(all_tokens, call.rows)
        return all_tokens.reshape(lead), all_conf.reshape(lead)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """The full logits [..., vocab] on every rank (shards padded to a common width)."""
        width = max(self.sizes)
        padded = nn.functional.pad(logits, (0, width - self.size)).contiguous()
        pieces = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(pieces, padded, group=self.group)
        return torch.cat([piece[..., :size] for piece, size in zip(pieces, self.sizes)], dim=-1)


# --------------------------------------------------------------------------- sampling a shard


def shard_statistics(logits: torch.Tensor, row_ids: torch.Tensor, col_start: int, *, banned: torch.Tensor | None,
                     temperature: float, conf_temperature: float, seed: int, offset: int) -> torch.Tensor:
    """Per-row statistics [R, N_STATS] (float64) of one vocabulary shard: logits [R, size]
    hold ids col_start.. of rows row_ids. Computed as unmask.reference.sample computes
    the whole row (float64 from each logit's float32 value, the same Gumbel draws), so
    combine_statistics reproduces its token exactly and its confidence to rounding.

    max (kept logit), best (Gumbel score, or the max at T = 0) and its global id and
    logit, the second-largest kept logit (margin), sum of exp(y - max_y) and of
    exp(y - max_y) * (y - max_y) with y = logit / conf_temperature, and a NaN/+inf flag.
    """
    if banned is not None:
        banned = banned[(banned >= col_start) & (banned < col_start + logits.shape[-1])] - col_start
    x, bad = reference.banned_and_invalid(logits, banned)
    neg_inf = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64, device=x.device)

    top2 = x.topk(min(2, x.shape[-1]), dim=-1).values
    largest = top2[:, 0]
    second = top2[:, 1] if top2.shape[-1] > 1 else neg_inf
    if temperature == 0.0:
        scores = x
    else:
        scores = x / temperature + rng.gumbel(seed, row_ids, x.shape[-1], offset=offset, col_start=col_start).to(x.device)
    best, best_local = scores.max(dim=-1)  # first maximum: ties go to the lower id
    best_logit = x.gather(-1, best_local[:, None]).squeeze(-1)

    y = x / conf_temperature
    y_max = y.max(dim=-1, keepdim=True).values
    shifted = y - torch.where(torch.isfinite(y_max), y_max, 0.0)
    weights = torch.exp(shifted)
    total = weights.sum(dim=-1)
    weighted = torch.where(weights > 0, weights * shifted, 0.0).sum(dim=-1)
    return torch.stack([largest, best, (best_local + col_start).double(), best_logit, second, total, weighted,
                        bad.any(dim=-1).double()], dim=-1)


def combine_statistics(stats: torch.Tensor, row_ids: torch.Tensor, *, confidence: str, temperature: float,
                       conf_temperature: float, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (int64) and confidences (float32) [R] from every shard's statistics [W, R, N_STATS].

    The winner is the shard with the best score, ties to the lower id (whatever the
    shard order). The softmax sums of the shards are rescaled to the global maximum
    (the online-softmax merge) before the confidence is formed.
    """
    best = stats[..., STAT_BEST]
    top = best.max(dim=0).values
    ids = torch.where(best == top, stats[..., STAT_BEST_ID], float("inf"))
    winner = ids.argmin(dim=0)
    pick = lambda column: stats[..., column].gather(0, winner[None]).squeeze(0)  # noqa: E731
    tokens = pick(STAT_BEST_ID).to(torch.int64)

    shard_max = stats[..., STAT_MAX]
    global_max = shard_max.max(dim=0).values
    invalid = (stats[..., STAT_BAD] > 0).any(dim=0) | ~torch.isfinite(global_max)
    y_max = torch.where(torch.isfinite(global_max), global_max / conf_temperature, 0.0)
    shard_y_max = torch.where(torch.isfinite(shard_max), shard_max / conf_temperature, y_max)
    rescale = torch.exp(shard_y_max - y_max)  # 1 for the shard holding the maximum
    total = (stats[..., STAT_SUM] * rescale).sum(dim=0)

    def prob_of(logit):
        return torch.exp(logit / conf_temperature - y_max) / total

    if confidence == "random":
        conf = rng.random_confidence(seed, row_ids, offset=offset).to(stats.device)
    elif confidence == "prob":
        conf = prob_of(pick(STAT_BEST_LOGIT))
    elif confidence == "margin":
        candidates = torch.cat([shard_max, stats[..., STAT_SECOND]], dim=0)
        top2 = candidates.topk(2, dim=0).values
        conf = prob_of(top2[0]) - prob_of(top2[1])
    elif confidence == "entropy":
        # sum_i p_i log p_i = (sum_i e_i a_i) / Z - log Z, with a_i = y_i - y_max, e_i = exp(a_i):
        # a shard's sum of e * (y - its own max) moves to the global max by adding its shift.
        shift = shard_y_max - y_max
        weighted = (rescale * (stats[..., STAT_WEIGHTED] + stats[..., STAT_SUM] * shift)).sum(dim=0)
        conf = weighted / total - torch.log(total)
    else:
        raise ValueError(f"confidence must be one of {validation.CONFIDENCE_KINDS}, got {confidence!r}")
    tokens = tokens.masked_fill(invalid, -1)
    conf = conf.masked_fill(invalid, float("-inf"))
    return tokens, conf.float()


# --------------------------------------------------------------------------- sharding the model


def _shard_experts(moe, mesh, device) -> None:
    """A mixture's routed experts split as its dense MLP is: each rank holds a contiguous
    slice of every expert's hidden units (gate and up rows, down columns: dim 1 of the
    [E, f, d] stacks, dim 2 of [E, d, f]), so it computes its share of each routed output
    and the layer completes the sum with one float32 all-reduce (MixtureOfExperts.forward).
    Every rank routes every token (the router is replicated): no token moves between ranks.
    Each rank cuts its slice where the stack is (the host, for a loaded checkpoint) and
    moves only that to `device`: a whole stack never reaches it."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    for name, dim in (("expert_gate", 1), ("expert_up", 1), ("expert_down", 2)):
        param = getattr(moe, name)
        local = param.data.chunk(world, dim)[rank].contiguous().to(device)  # Shard(dim)'s piece of this rank
        setattr(moe, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(dim)], run_check=False),
                                        requires_grad=False))


def tensor_parallel(model, mesh=None):
    """Shard an unmask DiffusionTransformer over a 1-D DeviceMesh (default: init()), in
    place, and return it. Every rank must hold the same weights (load the same checkpoint,
    or seed the random initialisation). Afterwards model(...) returns this rank's slice
    of the vocabulary and unmask.generate samples across the ranks."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from unmask.models import DiffusionTransformer

    if not isinstance(model, DiffusionTransformer):
        raise TypeError(f"model must be an unmask DiffusionTransformer, got {type(model).__name__}")
    if getattr(model, "vocab_shard", None) is not None:
        raise ValueError("model is already tensor-parallel")
    mesh = init() if mesh is None else mesh
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be one-dimensional (the tensor-parallel ranks), got {mesh.ndim} dimensions")
    ranks = mesh.mesh.tolist()
    if ranks != sorted(ranks):
        # torch shards the head by mesh position, the vocabulary offsets and the gathers
        # here go by rank in the process group (ascending): out of order, ids would be wrong
        raise ValueError(f"mesh must list its ranks in ascending order, got {ranks}")
    world = mesh.size()
    config = model.config
    validation.check_even_split(config, world, "ranks")
    check_vocab_split(config.embedding_size, world)

    if config.weight_tying:  # the head is split over the vocabulary; the embedding stays whole
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    for layer in model.layers:  # before the rest moves: the experts are most of a mixture's weights
        if layer.moe is not None:
            _shard_experts(layer.moe, mesh, device)
    model.to(device)
    plan = {}
    for index, layer in enumerate(model.layers):
        mlp = f"layers.{index}." if layer.moe is None else f"layers.{index}.moe.shared."
        plan.update({f"layers.{index}.{name}": ColwiseParallel() for name in ATTENTION_COLUMN_SPLIT})
        plan[f"layers.{index}.o_proj"] = RowwiseParallel()
        if layer.moe is None or layer.moe.shared is not None:  # the dense MLP or the shared experts
            plan.update({mlp + name: ColwiseParallel() for name in MLP_COLUMN_SPLIT})
            plan[mlp + "down_proj"] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1))
    parallelize_module(model, mesh, plan)

    group = mesh.get_group()
    size = local_share(model.lm_head.weight).shape[0]
    sizes = [torch.zeros(1, dtype=torch.int64, device=model.embed.weight.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([size], device=model.embed.weight.device), group=group)
    sizes = tuple(int(s) for s in sizes)
    rank = dist.get_rank(group)
    model.vocab_shard = VocabShard(sum(sizes[:rank]), size, config.embedding_size, sizes, group)
    return model
