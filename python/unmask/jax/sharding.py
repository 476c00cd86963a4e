"""The JAX model across devices: jax.sharding for the weights, shard_map around the
Pallas kernels, so the functional model runs on a TPU slice (or several GPUs).

A Mesh with one named axis, "model", over the devices. Weights are placed with
NamedSharding as in Megatron tensor parallelism: q, k, v, gate and up projections
split by output features (heads and MLP units), o_proj and down_proj by input
features, the LM head by vocabulary; embeddings, norms and a mixture's router
replicated. Under jit,
XLA's SPMD partitioner runs the matrix products on the shards and inserts the two
all-reduces per layer. The Pallas kernels are opaque to that partitioner, so each
runs under shard_map on its slice:

- attention: each device computes its own heads (GQA: a contiguous slice of query
  heads reads the matching slice of key/value heads), with no communication;
- sample: the vocabulary-split logits are resharded by rows (an all-to-all, each
  device then holds whole rows of 1/n of the positions), and each device runs the
  sample kernel on its rows with its row base, so the RNG draws and the tokens are
  those of one device. Sampling needs the whole row (top_k, top_p, the softmax of
  the confidence), which is why the rows move rather than the statistics;
- commit works on the [B, block] canvas, a few kilobytes: it runs replicated;
- a mixture's routed experts (LLaDA 2.0): each device runs the grouped products on its
  slice of every expert's hidden units, and a psum adds the shares.

    mesh = unmask.jax.sharding.make_mesh()          # every device
    model = unmask.jax.sharding.shard(unmask.jax.from_pretrained(DIR), mesh)
    out = unmask.jax.generate(model, prompts, ...)  # the single-device tokens

On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before importing jax)
gives 8 host devices to try it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unmask import validation
from unmask.jax import kernels
from unmask.jax.model import JaxModel, routed_experts

AXIS = "model"

# How each parameter of a layer is split over AXIS (weights are [out, in], as in torch).
LAYER_SPECS = {
    "attn_norm": P(), "mlp_norm": P(), "q_norm": P(), "k_norm": P(),
    "q_proj": P(AXIS, None), "k_proj": P(AXIS, None), "v_proj": P(AXIS, None),
    "q_proj_bias": P(AXIS), "k_proj_bias": P(AXIS), "v_proj_bias": P(AXIS),
    "gate_proj": P(AXIS, None), "up_proj": P(AXIS, None),
    "o_proj": P(None, AXIS), "down_proj": P(None, AXIS),
    # A mixture (LLaDA 2.0): each expert's hidden units split as the dense MLP's (the
    # stacks are ragged_dot's [E, in, out]), the shared experts as the dense MLP, the
    # router replicated (every device routes every token).
    "router": P(), "expert_bias": P(),
    "experts_gate": P(None, None, AXIS), "experts_up": P(None, None, AXIS), "experts_down": P(None, AXIS, None),
    "shared_gate": P(AXIS, None), "shared_up": P(AXIS, None), "shared_down": P(None, AXIS),
}


def _shard_map(body, mesh, in_specs, out_specs):
    # jax.shard_map since JAX 0.6; the experimental module before.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def make_mesh(devices=None) -> Mesh:
    """A one-axis Mesh named "model" over the given devices (default: all of them)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices: need at least one device")
    return Mesh(np.array(devices), (AXIS,))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def shard_params(params: dict, mesh: Mesh) -> dict:
    """The parameter pytree placed on the mesh. The LM head's vocabulary is padded with
    zero rows to a multiple of the device count (NamedSharding splits evenly); the model
    drops those ids from its logits."""
    n = mesh.size

    def put(array, spec):
        return jax.device_put(array, NamedSharding(mesh, spec))

    head = params["lm_head"]
    head = jnp.pad(head, ((0, _round_up(head.shape[0], n) - head.shape[0]), (0, 0)))
    return {
        "embed": put(params["embed"], P()),
        "final_norm": put(params["final_norm"], P()),
        "lm_head": put(head, P(AXIS, None)),
        "layers": [{name: put(value, LAYER_SPECS[name]) for name, value in layer.items()} for layer in params["layers"]],
    }


@dataclasses.dataclass
class ShardedJaxModel(JaxModel):
    """A JaxModel whose weights are split over mesh's "model" axis; call and sample as usual."""

    mesh: Mesh | None = None

    @property
    def attention_fn(self):
        return functools.partial(sharded_attention, self.mesh)

    @property
    def experts_fn(self):
        return functools.partial(sharded_routed_experts, self.mesh)

    def sample_logits(self, logits, **kwargs):
        return sharded_sample(self.mesh, logits, interpret=self.interpret, **kwargs)


def shard(model: JaxModel, mesh: Mesh | None = None) -> ShardedJaxModel:
    """model's weights split over mesh (default: make_mesh()). Heads and MLP units must
    divide evenly over the devices."""
    mesh = make_mesh() if mesh is None else mesh
    if mesh.axis_names != (AXIS,):
        raise ValueError(f"mesh must have the single axis {AXIS!r}, got {mesh.axis_names}")
    config = model.config
    validation.check_even_split(config, mesh.size, "devices")
    return ShardedJaxModel(shard_params(model.params, mesh), config, model.interpret, model.stop_ids, mesh=mesh)


def sharded_attention(mesh: Mesh, q, k, v, *, key_valid=None, block_size=None, q_offset=0, interpret=None):
    """unmask.jax.attention with the heads split over the mesh: [B, L, H, D] arrays,
    each device running the Pallas kernel on its H / n heads. q_offset: an int or a 0-d
    array (a traced window start), replicated."""
    heads = P(None, None, AXIS, None)
    offset_is_array = isinstance(q_offset, jax.Array)

    def body(q, k, v, *rest):
        rest = list(rest)
        offset = rest.pop() if offset_is_array else q_offset
        valid = rest[0] if rest else None
        return kernels.attention(q, k, v, key_valid=valid, block_size=block_size, q_offset=offset,
                                 interpret=interpret)

    operands, specs = (q, k, v), (heads, heads, heads)
    if key_valid is not None:
        operands, specs = operands + (key_valid,), specs + (P(),)
    if offset_is_array:
        operands, specs = operands + (q_offset,), specs + (P(),)
    return _shard_map(body, mesh, specs, heads)(*operands)


def sharded_routed_experts(mesh: Mesh, h, experts, weights, gate, up, down):
    """unmask.jax.model.routed_experts with each expert's hidden units split over the
    mesh: each device runs the grouped products on its slice of every expert (the
    tokens and their routing replicated) and one float32 psum adds the shares, as the
    torch model's tensor parallelism does. Under shard_map rather than left to XLA's
    partitioner, which need not split a ragged_dot along its groups' columns."""
    def body(h, experts, weights, gate, up, down):
        return jax.lax.psum(routed_experts(h, experts, weights, gate, up, down), AXIS)

    hidden_out, hidden_in = P(None, None, AXIS), P(None, AXIS, None)
    return _shard_map(body, mesh, (P(), P(), P(), hidden_out, hidden_out, hidden_in), P())(
        h, experts, weights, gate, up, down)


def sharded_sample(mesh: Mesh, logits, *, rows=None, offset=0, seed=0, banned=None, **kwargs):
    """unmask.jax.sample with the rows split over the mesh; the same tokens and
    confidences as one device (each row keeps its RNG row id). Compiled once per mesh,
    shape and sampling setting; offset (the step, or one per row of logits) and the seed
    are traced."""
    banned = None if banned is None else tuple(int(t) for t in np.asarray(banned).reshape(-1))
    kernels.check_offset(offset, logits.shape[:-1])  # before the rows are padded and split
    tokens, conf = _sharded_sample(mesh, logits, jnp.asarray(offset, jnp.uint32), kernels.seed_words(seed),
                                   banned=banned, **kwargs)
    return kernels.only_rows(tokens, conf, rows)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "banned", "temperature", "top_k", "top_p", "confidence", "conf_temperature", "interpret"))
def _sharded_sample(mesh: Mesh, logits, offset, seed, **kwargs):
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    n_rows = flat.shape[0]
    padded = _round_up(max(n_rows, 1), mesh.size * 8)  # 8: the sample kernel's row block
    local_rows = padded // mesh.size
    flat = jnp.pad(flat, ((0, padded - n_rows), (0, 0)))
    offset_spec = P()
    if offset.ndim:  # one per row: split with the rows
        offset, offset_spec = jnp.pad(offset.reshape(-1), (0, padded - n_rows)), P(AXIS)

    def body(block, offset, seed):
        row_base = jax.lax.axis_index(AXIS) * local_rows
        return kernels.sample(block, offset=offset, seed=seed, row_base=row_base, **kwargs)

    tokens, conf = _shard_map(body, mesh, (P(AXIS, None), offset_spec, P()), (P(AXIS), P(AXIS)))(flat, offset, seed)
    return tokens[:n_rows].reshape(lead), conf[:n_rows].reshape(lead)
