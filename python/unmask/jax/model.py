"""The bidirectional transformer as a pure JAX function over a parameter pytree, with
attention through the Pallas kernel. Weights come from the torch model (a state dict
or a checkpoint directory), so both frameworks run the same checkpoint.

LLaDA 2.0's mixture-of-experts MLPs route as the torch model does (MoeConfig) and run as
grouped matrix products (jax.lax.ragged_dot) over the token-expert pairs sorted by expert:
static shapes whatever the routing, so a step compiles once and never reads the host,
where the torch model reads each layer's expert counts (see _mixture_of_experts for
where ragged_dot is grouped and where it is not)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from unmask.jax.kernels import attention, default_interpret, sample
from unmask.models.config import ModelConfig, MoeConfig, stop_list


def params_from_state_dict(state_dict, config: ModelConfig, dtype=jnp.float32) -> dict:
    """A pytree of jnp arrays from the torch model's state_dict (our parameter names)."""
    def get(name):
        return jnp.asarray(state_dict[name].detach().float().cpu().numpy(), dtype)

    layers = []
    for i in range(config.n_layers):
        prefix = f"layers.{i}."
        layer = {name: get(prefix + name + ".weight") for name in
                 ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm")}
        moe = config.moe
        if moe is not None and moe.is_moe_layer(i):
            layer.update({"router": get(prefix + "moe.router.weight"),
                          # float32 whatever the dtype: it moves float32 scores (LLaDA 2.0 keeps it so)
                          "expert_bias": jnp.asarray(state_dict[prefix + "moe.expert_bias"].float().cpu().numpy()),
                          # the experts' stacked [E, out, in] weights as ragged_dot's [E, in, out]
                          **{f"experts_{name}": get(f"{prefix}moe.expert_{name}").transpose(0, 2, 1)
                             for name in ("gate", "up", "down")}})
            if moe.n_shared_experts:
                layer.update({f"shared_{name}": get(f"{prefix}moe.shared.{name}_proj.weight")
                              for name in ("gate", "up", "down")})
        else:
            layer.update({name: get(prefix + name + ".weight") for name in ("gate_proj", "up_proj", "down_proj")})
        if config.include_qkv_bias:
            layer.update({f"{name}_bias": get(prefix + name + ".bias") for name in ("q_proj", "k_proj", "v_proj")})
        if config.qk_norm:
            layer.update({name: get(prefix + name + ".weight") for name in ("q_norm", "k_norm")})
        layers.append(layer)
    head = "embed.weight" if config.weight_tying else "lm_head.weight"
    return {"embed": get("embed.weight"), "layers": layers, "final_norm": get("final_norm.weight"), "lm_head": get(head)}


def _rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * weight).astype(x.dtype)


def _rotary(x, positions, theta, dims: int):
    """Rotary embeddings (rotate-half) over each head's first `dims` dims; the rest pass
    through (LLaDA 2.0 turns half of each head)."""
    if dims < x.shape[-1]:
        return jnp.concatenate([_rotary(x[..., :dims], positions, theta, dims), x[..., dims:]], axis=-1)
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def forward(params, input_ids, attention_mask, *, config: ModelConfig, logit_start, logit_length: int,
            interpret: bool, attention_fn=attention, experts_fn=None):
    """Logits [B, logit_length, V] of positions logit_start.. (Dream: shifted right by
    one; V may carry zero-weight padding ids beyond the vocabulary, see
    unmask.jax.sharding). logit_start may be traced: one compiled forward serves every
    block of a canvas. attention_fn: the attention kernel call, experts_fn a mixture's
    routed sum (default routed_experts; unmask.jax.sharding wraps each in shard_map)."""
    logits, _ = forward_window(params, input_ids, attention_mask, config=config, logit_start=logit_start,
                               logit_length=logit_length, interpret=interpret, attention_fn=attention_fn,
                               experts_fn=experts_fn)
    return logits


def forward_window(params, input_ids, attention_mask, *, config: ModelConfig, logit_start, logit_length: int,
                   interpret: bool, attention_fn=attention, experts_fn=None, cache=None, window_start=0,
                   window_length=None, fresh_from=0, fresh_to=None):
    """forward over a window of the canvas with a key/value cache (unmask.generate's
    cache="prefix" / "dual", docs/design.md): (logits, cache).

    cache None: the whole canvas runs, and the cache returned holds every layer's keys
    (after rotary) and values, [B, L, Hkv, D] each. With a cache: only positions
    window_start .. + window_length run (window_length static, window_start traced);
    their keys and values replace the cache's in [fresh_from, fresh_to) (traced; the
    window's other positions keep the cached ones, so their queries are computed but
    reach nothing), and every query attends over the whole cached canvas. The logits' positions
    must lie in the window (one later when shifted). A block-causal model given an
    attention_mask rotates each row so that its block grid starts at its first real token
    (as the torch model's _GridRotation): the cache then holds rotated rows, and the window
    grows by one model block to cover every row's own blocks."""
    batch, length = input_ids.shape
    c = config
    if attention_mask is not None and c.positions_over_real_tokens:
        positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    else:
        positions = jnp.broadcast_to(jnp.arange(length)[None], (1, length))
    fresh_to = length if fresh_to is None else fresh_to
    # A shifted model's row predicts its first real token from its own position, as
    # position 0 alone (the torch model's _sources).
    first_real = None if attention_mask is None else jnp.argmax(attention_mask.astype(jnp.int32), axis=1)
    shift = None
    if c.block_size and attention_mask is not None:
        # As the torch model (_GridRotation): each row rotated left so that its first real
        # token starts a model block, as alone; the cache holds the rotated layout.
        shift = first_real % c.block_size  # [B]
        columns = (jnp.arange(length)[None] + shift[:, None]) % length
        input_ids, attention_mask = (jnp.take_along_axis(a, columns, axis=1) for a in (input_ids, attention_mask))
        positions = jnp.take_along_axis(jnp.broadcast_to(positions, (batch, length)), columns, axis=1)
        if cache is not None:
            # Each row recomputes its part of the fresh range, widened to its own model
            # blocks; the window (static width) grows by one model block to hold them all.
            size = c.block_size
            fresh_from = jnp.maximum((fresh_from - shift) // size * size, 0)[:, None]
            fresh_to = jnp.minimum(-(-(fresh_to - shift) // size) * size, length)[:, None]
            window_length = min(window_length + size, length)
            window_start = jnp.clip(window_start - size, 0, length - window_length)
    width = length if cache is None else window_length
    window = jax.lax.dynamic_slice_in_dim(positions, window_start, width, axis=1)
    x = params["embed"][jax.lax.dynamic_slice_in_dim(input_ids, window_start, width, axis=1)]
    in_window = (window_start + jnp.arange(width))[None]
    keep_cached = ((in_window < fresh_from) | (in_window >= fresh_to))[:, :, None, None]
    new_cache = []
    for index, layer in enumerate(params["layers"]):
        h = _rms_norm(x, layer["attn_norm"], c.rms_norm_eps)
        q, k, v = (h @ layer[name].T for name in ("q_proj", "k_proj", "v_proj"))
        if c.include_qkv_bias:
            q, k, v = q + layer["q_proj_bias"], k + layer["k_proj_bias"], v + layer["v_proj_bias"]
        q, k = q.reshape(batch, width, c.n_heads, c.head_dim), k.reshape(batch, width, c.n_kv_heads, c.head_dim)
        if c.qk_norm:  # Qwen3's per-head norms, before rotary
            q, k = _rms_norm(q, layer["q_norm"], c.rms_norm_eps), _rms_norm(k, layer["k_norm"], c.rms_norm_eps)
        q, k = _rotary(q, window, c.rope_theta, c.rotated_dims), _rotary(k, window, c.rope_theta, c.rotated_dims)
        v = v.reshape(batch, width, c.n_kv_heads, c.head_dim)
        if cache is not None:
            def merged(fresh, cached):
                kept = jax.lax.dynamic_slice_in_dim(cached, window_start, width, axis=1)
                return jax.lax.dynamic_update_slice_in_dim(cached, jnp.where(keep_cached, kept, fresh), window_start,
                                                           axis=1)

            k, v = merged(k, cache[index][0]), merged(v, cache[index][1])
        new_cache.append((k, v))
        if cache is not None and c.block_size:
            # The block-causal mask needs the queries' positions: the window's start, traced
            # (the kernel takes it as data, so one compiled step serves every block).
            out = attention_fn(q, k, v, key_valid=attention_mask, block_size=c.block_size,
                               q_offset=jnp.asarray(window_start, jnp.int32), interpret=interpret)
        else:
            out = attention_fn(q, k, v, key_valid=attention_mask, block_size=c.block_size, interpret=interpret)
        x = x + out.reshape(batch, width, c.n_heads * c.head_dim) @ layer["o_proj"].T
        h = _rms_norm(x, layer["mlp_norm"], c.rms_norm_eps)
        if "router" in layer:
            x = x + _mixture_of_experts(h.reshape(batch * width, -1), layer, c.moe,
                                        experts_fn or routed_experts).reshape(x.shape)
        else:
            x = x + _swiglu(h, layer["gate_proj"], layer["up_proj"], layer["down_proj"])
    wanted = logit_start + jnp.arange(logit_length)
    source = jnp.maximum(wanted - 1, 0) if c.shift_logits else wanted
    if c.shift_logits and first_real is not None:
        source = jnp.where(wanted[None] == first_real[:, None], wanted[None], source[None])  # [B, n]
    if shift is None and source.ndim == 1:
        hidden = x[:, source - window_start]
    else:  # each row's own columns (rotated: padding's logits are not specified, clamped into the window)
        columns = source if shift is None else (source - shift[:, None]) % length
        rows = jnp.clip(jnp.broadcast_to(columns, (batch, logit_length)) - window_start, 0, width - 1)
        hidden = jnp.take_along_axis(x, rows[:, :, None], axis=1)
    logits = _rms_norm(hidden, params["final_norm"], c.rms_norm_eps) @ params["lm_head"].T
    return logits, new_cache


def _swiglu(h, gate, up, down):
    """down(silu(gate h) * up h), weights [out, in] as in torch."""
    return (jax.nn.silu(h @ gate.T) * (h @ up.T)) @ down.T


def _route(h, router, expert_bias, moe: MoeConfig):
    """(experts [T, k], weights [T, k] float32) of tokens h [T, d], as the torch model's
    MixtureOfExperts.route: sigmoid scores in float32; experts chosen by score + bias
    within the top_groups groups ranked by their two best biased scores; the chosen
    unbiased scores normalised (k > 1) and scaled."""
    tokens = h.shape[0]
    # HIGHEST: strict float32 (the default is TF32 on a GPU, bfloat16 passes on a TPU),
    # so near-ties choose the experts torch chooses
    scores = jax.nn.sigmoid(jnp.matmul(h.astype(jnp.float32), router.astype(jnp.float32).T,
                                       precision=jax.lax.Precision.HIGHEST))
    biased = scores + expert_bias
    per_group = moe.n_experts // moe.n_groups
    group_scores = jax.lax.top_k(biased.reshape(tokens, moe.n_groups, per_group), 2)[0].sum(axis=-1)
    kept_groups = jax.lax.top_k(group_scores, moe.top_groups)[1]
    in_kept_group = jnp.zeros((tokens, moe.n_groups), bool).at[jnp.arange(tokens)[:, None], kept_groups].set(True)
    candidates = jnp.where(jnp.repeat(in_kept_group, per_group, axis=1), biased, -jnp.inf)
    experts = jax.lax.top_k(candidates, moe.experts_per_token)[1]
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if moe.experts_per_token > 1:  # normalised among the chosen (LLaDA 2.0 adds 1e-20)
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return experts, weights * moe.routed_scaling


def routed_experts(h, experts, weights, gate, up, down):
    """The routed sum float32 [T, d] of tokens h [T, d] (unmask.ops.moe_swiglu's contract,
    the weights as ragged_dot's [E, in, out]: gate and up [E, d, f], down [E, f, d]): the
    T * k (token, expert) pairs sorted by expert run as three grouped products (ragged_dot,
    group sizes traced), weighted and summed per token in float32. ragged_dot is grouped
    where the backend implements it (a TPU reads each expert's weights once for all its
    tokens); XLA:CPU expands it to a masked dense product over every expert (E times the
    work, [E, T * k, d] of temporaries): right on the CPU, but for checking, not for a
    real model's size."""
    pairs = experts.reshape(-1)
    order = jnp.argsort(pairs, stable=True)
    token_of = order // experts.shape[1]
    group_sizes = jnp.bincount(pairs, length=gate.shape[0]).astype(jnp.int32)
    routed_h = h[token_of]
    hidden = jax.nn.silu(jax.lax.ragged_dot(routed_h, gate, group_sizes)) * jax.lax.ragged_dot(routed_h, up,
                                                                                              group_sizes)
    y = jax.lax.ragged_dot(hidden, down, group_sizes).astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros(h.shape, jnp.float32).at[token_of].add(y)


def _mixture_of_experts(h, layer, moe: MoeConfig, experts_fn=routed_experts):
    """The MoE MLP of tokens h [T, d]: routed (_route), the routed sum (experts_fn:
    routed_experts, or unmask.jax.sharding's over a mesh) cast to h's dtype, then the
    shared experts' MLP added, as the torch model sums."""
    experts, weights = _route(h, layer["router"], layer["expert_bias"], moe)
    out = experts_fn(h, experts, weights, layer["experts_gate"], layer["experts_up"],
                     layer["experts_down"]).astype(h.dtype)
    if "shared_gate" in layer:
        out = out + _swiglu(h, layer["shared_gate"], layer["shared_up"], layer["shared_down"])
    return out


@dataclasses.dataclass
class JaxModel:
    """params + config, callable like the torch model: model(ids, attention_mask) -> logits."""

    params: dict
    config: ModelConfig
    interpret: bool | None = None
    stop_ids: tuple[int, ...] | None = None  # the torch model's (generation_config.json's EOS list)

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id

    @property
    def eos_id(self) -> int:
        return self.config.eos_token_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Where generate stops a row by default, as the torch model's eos_ids."""
        return stop_list(self.stop_ids, self.eos_id)

    def _jitted(self):
        """The jitted forward for the current interpret setting (kept per setting: a model
        whose interpret is changed after a call gets the kernels it now asks for)."""
        interpret = default_interpret(self.interpret)
        forwards = self.__dict__.setdefault("_jitted_forwards", {})
        if interpret not in forwards:
            forwards[interpret] = jax.jit(functools.partial(forward, config=self.config, interpret=interpret,
                                                            attention_fn=self.attention_fn,
                                                            experts_fn=self.experts_fn),
                                          static_argnames=("logit_length",))
        return forwards[interpret]

    @property
    def attention_fn(self):
        return attention

    @property
    def experts_fn(self):
        return routed_experts

    def __call__(self, input_ids, attention_mask=None, *, logit_start: int = 0, logit_end: int | None = None):
        input_ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(np.asarray(attention_mask), bool)
        end = input_ids.shape[1] if logit_end is None else logit_end
        logits = self._jitted()(self.params, input_ids, mask, logit_start=jnp.asarray(logit_start, jnp.int32),
                              logit_length=end - logit_start)
        return logits[..., :self.config.embedding_size]  # drop any padding ids of a sharded head

    def window_logits(self, params, input_ids, attention_mask, logit_start, logit_length: int, *, cache=None,
                      window_start=0, window_length: int | None = None, fresh_from=0, fresh_to=None):
        """forward_window with this model's settings: (logits [B, logit_length, V], cache).
        The sampler's compiled block loop calls it (inside its jit) for every step."""
        logits, cache = forward_window(
            params, input_ids, attention_mask, config=self.config, logit_start=logit_start, logit_length=logit_length,
            interpret=default_interpret(self.interpret), attention_fn=self.attention_fn,
            experts_fn=self.experts_fn, cache=cache,
            window_start=window_start, window_length=window_length, fresh_from=fresh_from, fresh_to=fresh_to)
        return logits[..., :self.config.embedding_size], cache

    def sample_logits(self, logits, **kwargs):
        """unmask.jax.sample with this model's interpret setting; the sampler calls this."""
        return sample(logits, interpret=self.interpret, **kwargs)


def from_torch(model, *, dtype=jnp.float32, interpret: bool | None = None) -> JaxModel:
    """The JAX twin of an unmask.DiffusionTransformer (same weights)."""
    return JaxModel(params_from_state_dict(model.state_dict(), model.config, dtype), model.config, interpret,
                    getattr(model, "stop_ids", None))


def from_pretrained(path, *, dtype=jnp.float32, interpret: bool | None = None) -> JaxModel:
    """Load a checkpoint directory (LLaDA, Dream, SDAR, LLaDA 2.0, ...) into JAX (through
    the torch loader)."""
    from unmask.models import from_pretrained as torch_from_pretrained

    return from_torch(torch_from_pretrained(path), dtype=dtype, interpret=interpret)
