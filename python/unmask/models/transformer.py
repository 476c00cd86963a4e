"""The bidirectional transformer behind LLaDA and Dream (docs/design.md, Models).

Pre-norm RMSNorm, rotary embeddings (rotate-half form), SwiGLU, grouped-query
attention with optional qkv bias, untied (or tied) LM head. Attention runs through
unmask.ops.attention, so the fused kernels serve the model directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from unmask import ops, validation
from unmask.models.config import ModelConfig, MoeConfig, stop_list


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # in float32 whatever x's dtype


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B or 1, L, 1, head_dim] for integer positions [B or 1, L], in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


@dataclasses.dataclass(frozen=True)
class RowSegments:
    """Each row's own segment of a cached forward: row b recomputes positions
    starts[b] .. starts[b] + length - 1 (a server's requests, each at its own block)."""

    starts: Sequence[int]
    length: int


@dataclasses.dataclass(frozen=True)
class DeviceSegment:
    """One segment of a cached forward for every row, whose first position is a 0-d int64
    tensor on the model's device: positions start .. start + length - 1. The forward then
    reads no host value of it, so a step captured once (CUDA graph) or traced once
    (torch.compile) serves every block. Models without a block-causal mask or shifted
    logits; logits come for the segment's first `logits` positions (None: all of them;
    the prefix cache recomputes a block and what follows it, and wants the block's). A
    start whose segment leaves the canvas is an index error on the device (the host
    cannot see it without a sync)."""

    start: torch.Tensor
    length: int
    logits: int | None = None


class KVCache:
    """Keys (after rotary embedding) and values of every layer for a whole canvas.

    generate(cache=...) fills it with one full forward at the start of a block and then
    recomputes only a segment of positions per step (the block, or the block and what
    follows it), writing that segment's keys and values in place: positions outside the
    segment keep the keys and values of the block's start (docs/design.md, cache).

    A block-causal model given an attention_mask writes each row rotated so that its block
    grid starts at its first real token (DiffusionTransformer._grid_rotation): the calls
    that read the cache must pass the attention_mask that filled it.
    """

    def __init__(self, config: ModelConfig, batch: int, length: int, *, dtype: torch.dtype, device: torch.device,
                 kv_heads: int | None = None):
        # kv_heads: the heads this process holds (fewer than config.n_kv_heads under tensor parallelism).
        shape = (batch, length, config.n_kv_heads if kv_heads is None else kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.keys[0].shape[:2]) if self.keys else (0, 0)

    @staticmethod
    def stacked(caches: Sequence[KVCache], length: int) -> KVCache:
        """The caches' rows one after another, each zero-padded to `length` positions."""
        if not caches or any(c.shape[1] > length for c in caches):
            raise ValueError(f"caches: one or more caches of at most length={length} positions, "
                             f"got {[c.shape for c in caches]}")
        return KVCache.gathered([(c, range(c.shape[0])) for c in caches], length)

    @staticmethod
    def gathered(pieces: Sequence[tuple[KVCache, Sequence[int]]], length: int) -> KVCache:
        """Chosen rows of several caches one after another (each piece's rows of its cache,
        in their order), cut or zero-padded to `length` positions. Two tensor operations
        per piece and layer, however many rows: a server restacks its requests' caches
        whenever one joins or leaves, and a copy per request cost it ~0.5 ms a step at 16."""
        if not pieces:
            raise ValueError("pieces: one or more (cache, rows) pairs")
        indices = []
        for number, (cache, rows) in enumerate(pieces):
            rows = list(rows)
            # checked on the host: a run past the end would shorten silently (and shift every
            # later piece's rows onto other requests'), a negative row would wrap
            if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < cache.shape[0] for r in rows):
                raise ValueError(f"pieces[{number}]: rows must be ints in [0, {cache.shape[0]}) (its cache's rows), "
                                 f"got {rows}")
            if rows and rows == list(range(rows[0], rows[0] + len(rows))):
                indices.append(slice(rows[0], rows[0] + len(rows)))  # a run: a view, no index
            else:
                indices.append(torch.tensor(rows, dtype=torch.int64, device=cache.keys[0].device))
        total = sum(len(rows) for _, rows in pieces)

        def gather(tensors: list[torch.Tensor]) -> torch.Tensor:
            out = tensors[0].new_zeros((total, length, *tensors[0].shape[2:]))
            row = 0
            for tensor, index in zip(tensors, indices):
                keep = min(length, tensor.shape[1])
                chosen = tensor[index, :keep] if isinstance(index, slice) else tensor[:, :keep].index_select(0, index)
                out[row:row + chosen.shape[0], :keep] = chosen
                row += chosen.shape[0]
            return out

        layers = range(len(pieces[0][0].keys))
        return KVCache._of([gather([cache.keys[layer] for cache, _ in pieces]) for layer in layers],
                           [gather([cache.values[layer] for cache, _ in pieces]) for layer in layers])

    def repeated(self, times: int, groups: int = 1) -> KVCache:
        """A copy for `times` canvases per row: the rows fall into `groups` equal groups
        (2 under classifier-free guidance: conditional rows, then unconditional ones) and
        each group becomes `times` copies of itself, one after another. Speculative
        decoding evaluates several canvases of a row that differ only where the segment
        writes, so each needs its own copy of what lies outside. One write of the copy
        (an expanded view copied out), not a repeat and then a concatenation."""

        def spread(tensor: torch.Tensor) -> torch.Tensor:
            grouped = tensor.unflatten(0, (groups, -1)).unsqueeze(1)  # [G, 1, B / G, L, H, D]
            # Into new memory: reshaping the expanded view can itself be a view (stride 0
            # where B / G is 1), whose canvases would all write one row.
            copy = tensor.new_empty((groups, times, *grouped.shape[2:]))
            return copy.copy_(grouped.expand_as(copy)).flatten(0, 2)

        return KVCache._of([spread(k) for k in self.keys], [spread(v) for v in self.values])

    def leading(self, rows: int) -> KVCache:
        """The first `rows` rows, a view (writes reach this cache)."""
        return KVCache._of([k[:rows] for k in self.keys], [v[:rows] for v in self.values])

    @staticmethod
    def _of(keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        cache = object.__new__(KVCache)
        cache.keys, cache.values = keys, values
        return cache


def swiglu(h: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """down(silu(gate(h)) * up(h)): the dense MLP, and each expert of a mixture."""
    return down(nn.functional.silu(gate(h)) * up(h))


class SwiGLU(nn.Module):
    """A shared expert of a mixture (swiglu with its own projections)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return swiglu(h, self.gate_proj, self.up_proj, self.down_proj)


def local_share(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's share of a DTensor (sharded by unmask.distributed), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _stacked_linear(count: int, out_features: int, in_features: int) -> nn.Parameter:
    """count [out, in] weights stacked: nn.Linear's layout and initial range per expert."""
    bound = in_features ** -0.5
    return nn.Parameter(torch.empty(count, out_features, in_features).uniform_(-bound, bound))


class MixtureOfExperts(nn.Module):
    """The MLP of a mixture-of-experts layer (config.MoeConfig says the routing).

    The routed experts' weights are stacked, each expert's in nn.Linear's [out, in]
    layout: expert_gate and expert_up [E, hidden, d], expert_down [E, d, hidden] (one
    tensor per projection for a grouped kernel to walk; the checkpoint's per-expert
    tensors are their slices). The routed sum runs through unmask.ops.moe_swiglu, whose
    torch backend (CUDA) reads the expert counts on the host once per layer: such a
    model's step is not captured as a CUDA graph."""

    def __init__(self, d: int, moe: MoeConfig):
        super().__init__()
        self.moe = moe
        self.router = nn.Linear(d, moe.n_experts, bias=False)
        # Added to the scores to choose experts, not to weight them; a buffer, as the
        # checkpoints store it (a load balancer updates it in training, not the optimizer).
        self.register_buffer("expert_bias", torch.zeros(moe.n_experts))
        self.expert_gate = _stacked_linear(moe.n_experts, moe.expert_hidden_size, d)
        self.expert_up = _stacked_linear(moe.n_experts, moe.expert_hidden_size, d)
        self.expert_down = _stacked_linear(moe.n_experts, d, moe.expert_hidden_size)
        self.shared = SwiGLU(d, moe.expert_hidden_size * moe.n_shared_experts) if moe.n_shared_experts else None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [T, k], weights [T, k] float32) of tokens h [T, d]."""
        m, tokens = self.moe, h.shape[0]
        scores = nn.functional.linear(h.float(), self.router.weight.float()).sigmoid()  # in float32, as LLaDA 2.0
        biased = scores + self.expert_bias.float()
        per_group = m.n_experts // m.n_groups
        group_scores = biased.view(tokens, m.n_groups, per_group).topk(2, dim=-1).values.sum(dim=-1)
        kept_groups = group_scores.topk(m.top_groups, dim=-1).indices
        in_kept_group = torch.zeros(tokens, m.n_groups, dtype=torch.bool, device=h.device)
        in_kept_group.scatter_(1, kept_groups, True)
        candidates = biased.masked_fill(~in_kept_group.repeat_interleave(per_group, dim=1), float("-inf"))
        experts = candidates.topk(m.experts_per_token, dim=-1).indices
        weights = scores.gather(1, experts)
        if m.experts_per_token > 1:  # normalised among the chosen (LLaDA 2.0 adds 1e-20)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * m.routed_scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mesh = getattr(self.expert_gate, "device_mesh", None)  # tensor-parallel (unmask.distributed)
        if mesh is not None and torch.is_grad_enabled() and h.requires_grad:
            raise NotImplementedError("a tensor-parallel mixture of experts is for inference: its routed shares are "
                                      "summed by an all-reduce autograd does not see; run it under torch.no_grad()")
        experts, weights = self.route(h)
        routed = ops.moe_swiglu(h, experts, weights, local_share(self.expert_gate), local_share(self.expert_up),
                                local_share(self.expert_down))
        if mesh is not None:  # each rank summed its share of every expert's hidden units; in float32
            torch.distributed.all_reduce(routed, group=mesh.get_group())
        out = routed.to(h.dtype)  # the routed sum in float32, then the activations' dtype, as LLaDA 2.0
        return out if self.shared is None else out + self.shared(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden_size
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.config = config
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, q_dim, bias=config.include_qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.include_qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.include_qkv_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=False)
        if config.qk_norm:  # Qwen3's, over each head's head_dim before rotary
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.mlp_norm = RMSNorm(d, config.rms_norm_eps)
        self.moe = None
        if config.moe is not None and config.moe.is_moe_layer(layer):
            self.moe = MixtureOfExperts(d, config.moe)
        else:
            self.gate_proj = nn.Linear(d, hidden, bias=False)
            self.up_proj = nn.Linear(d, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, parts: Sequence[_Part], layer: int) -> torch.Tensor:
        """x [T, d]: the tokens of every part, one after another (part p's rows, each of
        its positions start .. start + n - 1). Norms, projections and the MLP run once
        over all of them; rotary and attention per part, each part's queries over its own
        keys (with a cache: written into it, then the whole cached canvas)."""
        c = self.config
        h = self.attn_norm(x)
        # Heads counted from the projections, not the config: under tensor parallelism
        # (unmask.distributed) each rank holds a contiguous slice of the heads.
        q = self.q_proj(h).unflatten(-1, (-1, c.head_dim))
        k = self.k_proj(h).unflatten(-1, (-1, c.head_dim))
        v = self.v_proj(h).unflatten(-1, (-1, c.head_dim))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        attended = []
        sizes = [part.batch * part.length for part in parts]
        for part, part_q, part_k, part_v in zip(parts, q.split(sizes), k.split(sizes), v.split(sizes)):
            shape = (part.batch, part.length, -1, c.head_dim)
            part_q = _rotated(part_q.view(shape), part.cos, part.sin, c.rotated_dims)
            part_k = _rotated(part_k.view(shape), part.cos, part.sin, c.rotated_dims)
            attended.append(part.attend(part_q, part_k, part_v.view(shape), layer))
        attn = attended[0] if len(attended) == 1 else torch.cat(attended)
        x = x + self.o_proj(attn.flatten(-2))
        h = self.mlp_norm(x)
        if self.moe is not None:
            return x + self.moe(h)
        return x + swiglu(h, self.gate_proj, self.up_proj, self.down_proj)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotary embeddings over each head's first `dims` dims (all of them, or LLaDA 2.0's
    half); the rest pass through."""
    if dims == x.shape[-1]:
        return ops.rotary(x, cos, sin)
    return torch.cat([ops.rotary(x[..., :dims].contiguous(), cos, sin), x[..., dims:]], dim=-1)


@dataclasses.dataclass
class _Part:
    """One group of rows of a (packed) forward, checked and laid out: batch rows of
    `length` computed positions each, from `start` (an int, or a [B, 1] tensor of each
    row's own start)."""

    batch: int
    length: int
    start: int | torch.Tensor
    columns: torch.Tensor | None  # with a start per row: each row's positions [B, n]
    cos: torch.Tensor  # rotary tables [1 or B, n, 1, D]
    sin: torch.Tensor
    key_valid: torch.Tensor | None
    cache: KVCache | None
    block_size: int | None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention of the part's queries [B, n, H, D]: over its own keys, or with a cache
        over the whole cached canvas once this part's keys and values are written in.
        Returns [B * n, H, D]."""
        cache = self.cache
        if cache is not None:
            if self.columns is None:
                cache.keys[layer][:, self.start:self.start + self.length] = k
                cache.values[layer][:, self.start:self.start + self.length] = v
            else:  # rows at their own positions (a server's requests at different depths)
                rows = torch.arange(self.batch, device=q.device)[:, None]
                cache.keys[layer][rows, self.columns] = k
                cache.values[layer][rows, self.columns] = v
            k, v = cache.keys[layer], cache.values[layer]
        # Rows with their own starts come only without a block-causal mask (_row_starts),
        # which alone reads q_offset.
        q_offset = self.start if self.columns is None else 0
        attn = ops.attention(q, k, v, key_valid=self.key_valid, block_size=self.block_size, q_offset=q_offset)
        return attn.flatten(0, 1)


@dataclasses.dataclass(frozen=True)
class _GridRotation:
    """A block-causal model's rows rotated so that each row's first real token starts a
    model block (DiffusionTransformer._grid_rotation): row b's column c holds the canvas's
    column (c + shift[b]) mod L. Without it a row left-padded by other than a multiple of
    block_size met the block grid elsewhere than alone, and its tokens depended on the
    length of the longest prompt in its batch."""

    block_size: int
    shift: torch.Tensor  # [B] int64 in [0, block_size)
    columns: torch.Tensor  # [B, L]: the canvas column each rotated column holds

    def segment(self, start: int, end: int, length: int) -> tuple[int, int]:
        """The rotated columns a segment [start, end) of the canvas recomputes: each row's
        part of it, [start - shift, end - shift), widened to whole model blocks (a position
        sharing a model block with a recomputed one sees it, so its cached keys would be
        stale), for every shift a row may have. One range for all rows: the block-causal
        mask takes one query offset per call. At most one model block more than the rows
        need; those positions are recomputed from the same canvas, so nothing changes."""
        size = self.block_size
        return max((start - size + 1) // size * size, 0), min(-(-end // size) * size, length)

    def rotated(self, source: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Canvas positions [n] or [B, n] -> their rotated columns [B, n], clamped into the
        computed range [start, start + n) (a padding position left of it has no row of its
        own there; padding's logits are not specified)."""
        if source.dim() == 1:
            source = source.expand(self.shift.shape[0], -1)
        length = self.columns.shape[1]
        return ((source - self.shift[:, None]) % length).clamp(start, start + n - 1)


@dataclasses.dataclass(frozen=True)
class Rows:
    """One group of a packed forward (DiffusionTransformer.forward_packed): the arguments
    DiffusionTransformer.forward takes for one call."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    logit_positions: slice | torch.Tensor | None = None
    cache: KVCache | None = None
    segment: tuple[int, int] | RowSegments | None = None


class DiffusionTransformer(nn.Module):
    """model(input_ids [B, L], attention_mask [B, L] | None) -> logits [B, L, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.embedding_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.embedding_size, bias=False)
        if config.weight_tying:
            self.lm_head.weight = self.embed.weight
        self.tokenizer = None  # a tokenizers.Tokenizer when loaded from a directory that has one
        # The ids a row stops at, where a checkpoint's generation_config.json lists them
        # (eos_ids); None: the config's EOS alone.
        self.stop_ids: tuple[int, ...] | None = None
        # Set by unmask.distributed.tensor_parallel: the LM head then returns this rank's
        # slice of the vocabulary, and the sampler samples across the ranks.
        self.vocab_shard = None

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id

    @property
    def eos_id(self) -> int:
        return self.config.eos_token_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Where generate stops a row by default: generation_config.json's eos_token_id (one
        id or a list, as transformers and vLLM read it: a Qwen-based chat model lists
        <|im_end|> and <|endoftext|>) where the checkpoint has one, else the config's EOS.
        The config's EOS comes first where it is listed: it pads and fills, as before a
        list was read."""
        return stop_list(self.stop_ids, self.eos_id)

    @classmethod
    def random(cls, config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, std: float = 0.02) -> DiffusionTransformer:
        """A randomly initialised model: normal(0, std) weights and biases, unit norms.

        On the CPU (device None or "cpu") the weights are drawn in float32 and then cast,
        the same numbers on every machine. On an accelerator they are drawn there, in
        `dtype`, by that device's generator (other numbers for the same seed): an 8B model
        is made in a second instead of 32 GB of float32 on the host."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        if target.type == "cpu":
            model, generator = cls(config), torch.Generator().manual_seed(seed)  # float32 until the cast below
        else:
            with torch.device("meta"):
                model = cls(config).to(dtype)  # made in dtype: an 8B model in float32 would need 32 GB there
            model = model.to_empty(device=target)
            if config.weight_tying:
                model.lm_head.weight = model.embed.weight
            generator = torch.Generator(device=target).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:  # projections, embeddings and qkv biases alike
                    param.normal_(0.0, std, generator=generator)
        return model.to(device=target, dtype=dtype).eval()

    def _local_kv_heads(self) -> int:
        """The key/value heads this process holds (a share under tensor parallelism)."""
        if not len(self.layers):
            return self.config.n_kv_heads
        return local_share(self.layers[0].k_proj.weight).shape[0] // self.config.head_dim

    def new_cache(self, batch: int, length: int) -> KVCache:
        """An empty KVCache for a [batch, length] canvas, with the heads this process holds."""
        embed = self.embed.weight
        return KVCache(self.config, batch, length, dtype=embed.dtype, device=embed.device,
                       kv_heads=self._local_kv_heads())

    def _check_cache(self, cache: KVCache, batch: int, length: int, device: torch.device) -> None:
        """A cache made for this model (new_cache) and this canvas; another one failed deep
        in the layers (an index error, a head count that does not broadcast)."""
        if cache.shape != (batch, length):
            raise ValueError(f"cache holds a [{cache.shape[0]}, {cache.shape[1]}] canvas, input_ids is [{batch}, "
                             f"{length}]")
        heads = (self._local_kv_heads(), self.config.head_dim)
        dtype = self.embed.weight.dtype
        if len(cache.keys) != self.config.n_layers or tuple(cache.keys[0].shape[2:]) != heads:
            raise ValueError(f"cache must hold {self.config.n_layers} layers of {heads[0]} key/value heads of "
                             f"{heads[1]} dims (model.new_cache), got {len(cache.keys)} layers of shape "
                             f"{tuple(cache.keys[0].shape) if cache.keys else ()}")
        if cache.keys[0].dtype != dtype or cache.keys[0].device != device:
            raise ValueError(f"cache must be {dtype} on {device} (the model's), got {cache.keys[0].dtype} on "
                             f"{cache.keys[0].device}")

    def recomputed_segment(self, start: int, end: int, length: int, cache: str) -> tuple[int, int]:
        """The positions [first, stop) a cached step of block [start, end) of a canvas of
        `length` recomputes: the block, and everything after it under cache "prefix"; the
        position before it too where position i is predicted from i - 1 (Dream). A
        block-causal model's segment is widened to its own attention blocks: a position
        that shares a model block with the generation block sees that block's tokens (its
        keys change as they are filled in), so a cached copy of it would be stale
        wherever prompts or block_length are not multiples of block_size."""
        first = max(start - 1, 0) if self.config.shift_logits else start
        stop = end if cache == "dual" else length
        size = self.config.block_size
        if size is not None:
            first, stop = first // size * size, min(-(-stop // size) * size, length)
        return first, stop

    def _check_device_segment(self, segment: DeviceSegment, logit_positions, input_ids: torch.Tensor,
                              length: int) -> None:
        start = segment.start
        if not isinstance(start, torch.Tensor) or start.dim() != 0 or start.dtype != torch.int64:
            raise ValueError(f"segment.start must be a 0-d int64 tensor, got {start!r}")
        if start.device != input_ids.device:
            raise ValueError(f"segment.start must be on {input_ids.device} like input_ids, got {start.device}")
        if not isinstance(segment.length, int) or not 1 <= segment.length <= length:
            raise ValueError(f"segment.length must be an int in [1, {length}], got {segment.length!r}")
        if segment.logits is not None and (not isinstance(segment.logits, int)
                                           or not 1 <= segment.logits <= segment.length):
            raise ValueError(f"segment.logits must be None or an int in [1, {segment.length}], got {segment.logits!r}")
        if self.config.block_size is not None or self.config.shift_logits:
            raise ValueError("a DeviceSegment needs a model without a block-causal mask or shifted logits")
        if logit_positions is not None:
            raise ValueError("with a DeviceSegment the logits are those of the segment's positions: "
                             "logit_positions must be None")
        # The start's value, where reading it costs nothing (on the CPU, not while traced).
        readable = start.device.type == "cpu" and not torch.compiler.is_compiling()
        if readable and not 0 <= int(start) <= length - segment.length:
            raise ValueError(f"segment: 0 <= start and start + length <= {length} (the canvas), got start "
                             f"{int(start)}, length {segment.length}")

    def _row_starts(self, segment: RowSegments, batch: int, length: int) -> list[int]:
        """RowSegments' starts, checked against the canvas (and the model's mask)."""
        starts, n = list(segment.starts), segment.length
        if len(starts) != batch:
            raise ValueError(f"segment.starts must hold one start per row ({batch}), got {len(starts)}")
        if not isinstance(n, int) or n < 1 or any(not isinstance(s, int) or not 0 <= s <= length - n for s in starts):
            raise ValueError(f"segment: every row needs 0 <= starts[b] and starts[b] + segment.length <= {length} "
                             f"(the canvas), got {segment}")
        if self.config.block_size is not None and len(set(starts)) > 1:  # the block-causal mask takes one offset
            raise ValueError(f"segment: a block-causal model needs the same segment.starts for every row, got {starts}")
        return starts

    def positions(self, attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """Rotary positions [1 or B, L]: 0..L-1 (LLaDA), or counted over real tokens when
        prompts are left-padded (Dream). Rotary attention is relative, so the two agree
        on every real token; they differ only on the padding, which no query sees."""
        if attention_mask is None or not self.config.positions_over_real_tokens:
            return torch.arange(length, device=device)[None]
        return (attention_mask.to(device=device, dtype=torch.int64).cumsum(dim=1) - 1).clamp(min=0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        logit_positions: slice | torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment: tuple[int, int] | RowSegments | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, V]; with logit_positions (a slice or index over L, or an index
        [B, n] of positions per row) only those positions.

        attention_mask [B, L] marks real tokens: keys at False positions are invisible
        (left padding). Dream-style models (config.shift_logits) predict position i from
        the hidden state at i - 1. With a cache and no segment, the forward runs over the
        whole canvas and fills the cache; with segment=(start, end) it computes only those
        positions, attending over the cached keys and values of every other position, and
        logit_positions must fall inside the segment (one position later when shifted).
        segment=RowSegments(starts, n) gives each row its own segment of n positions; its
        logit_positions are then [B, m] per row. segment=DeviceSegment(start, n, logits=m)
        is one segment whose start is a 0-d device tensor (a captured step's): the logits
        of its first m positions (all n by default), logit_positions None.
        """
        return self.forward_packed([Rows(input_ids, attention_mask, logit_positions, cache, segment)])[0]

    def forward_packed(self, groups: Sequence[Rows]) -> list[torch.Tensor]:
        """forward() of several groups of rows in one pass: each group's logits, as its own
        forward() call would give them. The groups may differ in everything (canvas
        width, cache, segment); their tokens go through the norms, projections, MLP and
        LM head together, and only attention runs per group. One call instead of several
        saves their fixed per-call cost (a server's step with some requests filling
        their caches beside others recomputing their blocks)."""
        if not groups:
            raise ValueError("groups: one or more Rows")
        parts, embedded, picks = [], [], []
        for rows in groups:
            part, ids, pick = self._lay_out(rows)
            parts.append(part)
            embedded.append(self.embed(ids).flatten(0, 1))
            picks.append(pick)
        x = embedded[0] if len(embedded) == 1 else torch.cat(embedded)
        for index, layer in enumerate(self.layers):
            x = layer(x, parts, index)
        chosen = []
        for part, pick, hidden in zip(parts, picks, x.split([part.batch * part.length for part in parts])):
            hidden = hidden.view(part.batch, part.length, -1)
            chosen.append(hidden if pick is None else pick(hidden))
        if len(chosen) == 1:
            return [self.lm_head(self.final_norm(chosen[0]))]
        logits = self.lm_head(self.final_norm(torch.cat([h.flatten(0, 1) for h in chosen])))
        rows = logits.split([h.shape[0] * h.shape[1] for h in chosen])
        return [part_logits.view(*h.shape[:2], -1) for h, part_logits in zip(chosen, rows)]

    def _first_real(self, key_valid: torch.Tensor | None) -> torch.Tensor | None:
        """Each row's first real column [B] int64, where the model needs it: a block-causal
        model's grid starts there (_grid_rotation), a shifted model's first token keeps its
        own state (_sources). argmax returns the first maximum (0 for a row of padding
        alone, which no one reads); no host read, so a device batch does not sync."""
        if key_valid is None or (self.config.block_size is None and not self.config.shift_logits):
            return None
        return key_valid.to(torch.int32).argmax(dim=1).to(torch.int64)

    def _grid_rotation(self, first_real: torch.Tensor | None, length: int) -> "_GridRotation | None":
        """How a block-causal model lays out rows with hidden keys (None: as they are)."""
        size = self.config.block_size
        if size is None or first_real is None:
            return None
        shift = first_real % size
        columns = (torch.arange(length, device=first_real.device) + shift[:, None]) % length
        return _GridRotation(size, shift, columns)

    def _sources(self, wanted: torch.Tensor, first_real: torch.Tensor | None, stop) -> torch.Tensor:
        """The positions whose hidden states give the logits of positions `wanted`: their
        own, or the one before when logits shift, a row's first token keeping its own (as
        position 0 does alone; first_real [B]: each left-padded row's first real column,
        whose logit would otherwise come from the pad before it). stop (an int, or [B, 1]):
        the end of the positions computed; a first token at or past it, whose state is not
        computed, keeps the pad before it (that row's computed positions are all padding)."""
        if not self.config.shift_logits:
            return wanted
        before = (wanted - 1).clamp(min=0)
        if first_real is None:
            return before
        rows = wanted if wanted.dim() == 2 else wanted[None]
        return torch.where((rows == first_real[:, None]) & (rows < stop), rows, before)

    def _check_sources(self, source: torch.Tensor, logit_positions, length: int, starts: list[int], n: int) -> None:
        """With a segment, the hidden states behind the logits asked for (source) must be
        the segment's own: outside it, the index into the segment would wrap round to other
        rows, silently. A slice is checked in host arithmetic (no tensor is read: on a
        device that would synchronise, and the sampler's cached steps pass slices), an
        index tensor where it is on the CPU; a device index is not read."""
        if isinstance(logit_positions, slice):
            wanted = range(length)[logit_positions]
            if len(wanted) == 0:
                return
            # the sources of its ends, as _sources maps them (monotone: they bound the rest;
            # a row's first token, keeping its own, lies inside whenever the one before does)
            ends = [max(w - int(self.config.shift_logits), 0) for w in (wanted[0], wanted[-1])]
            outside = min(ends) < max(starts) or max(ends) >= min(starts) + n
        elif source.device.type == "cpu" and source.numel() > 0:
            first = torch.tensor(starts)[:, None]  # each row's segment (one row where all share it)
            outside = bool(((source < first) | (source >= first + n)).any())
        else:
            return
        if outside:
            shift = (" (this model predicts position i from i - 1: its logits lie one position after the "
                     "segment's first)") if self.config.shift_logits else ""
            raise ValueError(f"logit_positions: logits asked for come from positions outside the segment (starts "
                             f"{starts}, length {n}){shift}")

    def _lay_out(self, rows: Rows):
        """A group checked and laid out: its _Part, the ids [B, n] of the positions it
        computes, and how to pick its logits' rows out of its hidden states [B, n, d]
        (None: all of them)."""
        input_ids, attention_mask, logit_positions, cache, segment = (
            rows.input_ids, rows.attention_mask, rows.logit_positions, rows.cache, rows.segment)
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be [B, L] with B, L >= 1, got shape {tuple(input_ids.shape)}")
        if not _holds_ids(input_ids):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        batch, length = input_ids.shape
        if logit_positions is not None and not isinstance(logit_positions, slice) and not (
                _holds_ids(logit_positions)
                and (logit_positions.dim() == 1 or logit_positions.dim() == 2 and logit_positions.shape[0] == batch)):
            # anything else indexed the positions into another layout than [B, n, V] (a
            # [1, n] index returned row 0's logits alone, an int dropped the n axis)
            shape = tuple(logit_positions.shape) if isinstance(logit_positions, torch.Tensor) else None
            raise ValueError(f"logit_positions must be a slice, or an integer tensor [n] or [B={batch}, n], got "
                             f"{type(logit_positions).__name__}" + (f" {logit_positions.dtype} {shape}" if shape else ""))
        key_valid = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"attention_mask must have shape {(batch, length)}, got {tuple(attention_mask.shape)}")
            key_valid = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if segment is not None and cache is None:
            raise ValueError("segment needs a cache holding the keys and values of the other positions")
        if cache is not None:
            self._check_cache(cache, batch, length, input_ids.device)
        positions = self.positions(attention_mask, batch, length, input_ids.device)
        # A block-causal model sees each row with its block grid from its first real token,
        # as the row alone (unpadded) sees it: the row's columns are rotated left by the
        # first token's offset into its block (_grid_rotation). Padding, invisible, wraps
        # round to the end; rotary attention is relative, so the positions move with the
        # tokens. The cache, written here, holds the rotated layout.
        first_real = self._first_real(key_valid)
        rotation = self._grid_rotation(first_real, length)
        if rotation is not None:
            input_ids, key_valid = input_ids.gather(1, rotation.columns), key_valid.gather(1, rotation.columns)
            positions = positions.expand(batch, -1).gather(1, rotation.columns)
        columns = None
        if isinstance(segment, RowSegments):
            starts = self._row_starts(segment, batch, length)
            if len(set(starts)) == 1:  # one segment after all
                segment = (starts[0], starts[0] + segment.length)
        if isinstance(segment, (RowSegments, DeviceSegment)):
            # Rows at positions held on the device: the columns each computes (written into
            # the cache by index; no block-causal mask, so q_offset is unused).
            if isinstance(segment, DeviceSegment):
                self._check_device_segment(segment, logit_positions, input_ids, length)
                start = segment.start.reshape(1, 1)
            else:
                start = torch.tensor(starts, dtype=torch.int64, device=input_ids.device)[:, None]
            columns = (start + torch.arange(segment.length, device=input_ids.device)).expand(batch, -1)
            positions = positions.expand(batch, -1).gather(1, columns)
            ids = input_ids.gather(1, columns)
        else:
            start, end = (0, length) if segment is None else segment
            if not 0 <= start < end <= length:
                raise ValueError(f"segment must satisfy 0 <= start < end <= {length}, got {segment}")
            asked = start, end
            if rotation is not None and segment is not None:
                start, end = rotation.segment(start, end, length)
            positions, ids = positions[:, start:end], input_ids[:, start:end]
        cos, sin = rotary_tables(positions, self.config.rotated_dims, self.config.rope_theta)
        part = _Part(batch, ids.shape[1], start, columns, cos, sin, key_valid, cache, self.config.block_size)

        pick = None
        if isinstance(rows.segment, DeviceSegment) and rows.segment.logits is not None:
            first = rows.segment.logits
            pick = lambda x: x[:, :first]  # noqa: E731
        rows_apart = columns is not None
        if segment is not None and self.config.shift_logits and logit_positions is None:
            raise ValueError("logit_positions: a model that predicts i from i - 1 needs them with a segment "
                             "(the segment's first position has no logit of its own)")
        if logit_positions is not None or self.config.shift_logits or rotation is not None:
            wanted = torch.arange(length, device=input_ids.device)
            if logit_positions is not None:
                wanted = wanted[logit_positions]
            elif segment is not None and rotation is not None:
                wanted = wanted[asked[0]:asked[1]]  # the segment's own positions, as without rotation
            if segment is None:
                stop = length
            else:
                stop = start + ids.shape[1] if rows_apart else asked[1]
            source = self._sources(wanted, first_real, stop)
            if rows_apart and source.dim() == 1:
                source = source.expand(batch, -1)
            if segment is not None and not isinstance(segment, DeviceSegment):
                checked = (starts, ids.shape[1]) if rows_apart else ([asked[0]], asked[1] - asked[0])
                self._check_sources(source, logit_positions, length, *checked)
            if rotation is not None:
                source = rotation.rotated(source, start, ids.shape[1])
            if source.dim() == 2:  # per-row positions [B, n] (a server's rows at different depths)
                index = (source - start)[:, :, None]
                pick = lambda x: x.gather(1, index.expand(-1, -1, x.shape[-1]))  # noqa: E731
            else:
                index = source - start
                pick = lambda x: x[:, index]  # noqa: E731
        return part, ids, pick


def _holds_ids(value) -> bool:
    """A tensor of ids or positions in a dtype torch embeds and indexes with (int32, int64)."""
    return isinstance(value, torch.Tensor) and validation.dtype_name(value) in validation.INT_DTYPES
