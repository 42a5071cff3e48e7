"""The routed experts with a reverse-mode gradient, on one device or expert-parallel.

The inference kernels (`nn/moe_kernels.py`) run a dynamic number of blocks (only the ones
the routing fills) under `fori_loop`, and JAX cannot reverse-differentiate a loop whose
trip count is not static. A static count (every block a token could need) would make
each expert shard pay for every row, its own or not, E/expert times the work. So the
forward here *is* `moe_kernels.sorted_blocks`, and its gradient is written out
(`jax.custom_vjp`): the backward walks the same kind of expert-sorted blocks, again only
the used ones, recomputing each block's SwiGLU and taking its VJP. It is exact
(dropless, no capacity) and stays linear in the rows a shard owns.

Expert parallel as `nn/expert_parallel.py` (all_gather over `expert`, local kernel,
psum_scatter back), with this kernel inside: that module looks its local kernel up by
name among the inference kernels. The collectives' transposes carry the gradient back.

Names: N tokens, D hidden, E experts (local), K experts per token, F expert width,
R = N·K assignments, B block size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from smallfour import sharding
from smallfour.nn import expert_parallel, moe_kernels

_F32 = jnp.float32


def routed_experts(gate: jax.Array, up: jax.Array, down: jax.Array, x: jax.Array,
                   weights: jax.Array, ids: jax.Array) -> jax.Array:
  """`Σ_k w_k · expert_{id_k}(x)`, differentiable in every float input.

  Expert-parallel under a multi-device mesh (`jax.set_mesh`), else on the whole arrays.
  gate/up: [E, D, F], down: [E, F, D], x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  mesh = jax.sharding.get_abstract_mesh()
  block = moe_kernels.default_block_size(ids.size, gate.shape[0])
  if mesh.empty or mesh.size == 1:
    return sorted_blocks(gate, up, down, x, weights, ids, block)
  return _expert_parallel(gate, up, down, x, weights, ids, mesh)


def _expert_parallel(gate, up, down, x, weights, ids, mesh) -> jax.Array:
  """`expert_parallel.routed_experts` with `sorted_blocks` (this file's) as local kernel."""
  n, k = ids.shape
  row_spec = sharding.logical_spec(expert_parallel.ROW_AXES)
  row_axes = (row_spec[0],) if isinstance(row_spec[0], str) else tuple(row_spec[0] or ())
  groups = 1
  for axis in row_axes:
    groups *= mesh.shape[axis]
  pad = -n % groups
  if pad:  # padding rows own no expert (id -1): no work, zero output and gradient
    x = jnp.pad(x, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    ids = jnp.pad(ids, ((0, pad), (0, 0)), constant_values=-1)
  tokens = (n + pad) // (groups // mesh.shape["expert"])  # gathered per shard
  block = moe_kernels.default_block_size(tokens * k, gate.shape[0])

  def shard(gate, up, down, x, weights, ids):
    x, weights, ids = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                       for a in (x, weights, ids))
    first = jax.lax.axis_index("expert") * gate.shape[0]
    out = sorted_blocks(gate, up, down, x, weights, ids - first, block)
    out = jax.lax.psum(out, "tensor")
    return jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)

  in_spec = sharding.logical_spec(expert_parallel.IN_WEIGHT_AXES)
  out_spec = sharding.logical_spec(expert_parallel.OUT_WEIGHT_AXES)
  # check_vma=False as in expert_parallel: the kernel's loops start from fresh zeros.
  out = jax.shard_map(shard, mesh=mesh,
                      in_specs=(in_spec, in_spec, out_spec, row_spec, row_spec, row_spec),
                      out_specs=row_spec, check_vma=False)(gate, up, down, x, weights, ids)
  return out[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def sorted_blocks(gate: jax.Array, up: jax.Array, down: jax.Array, x: jax.Array,
                  weights: jax.Array, ids: jax.Array, block_size: int) -> jax.Array:
  """`moe_kernels.sorted_blocks` (ids outside [0, E) contribute nothing), with a gradient.

  gate/up: [E, D, F], down: [E, F, D], x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  return moe_kernels.sorted_blocks(gate, up, down, x, weights, ids, block_size=block_size)


def _forward(gate, up, down, x, weights, ids, block_size):
  out = sorted_blocks(gate, up, down, x, weights, ids, block_size)
  return out, (gate, up, down, x, weights, ids)


def _backward(block_size, residuals, g):
  """Cotangents of (gate, up, down, x, weights) for the output cotangent g: [N, D]."""
  gate, up, down, x, weights, ids = residuals
  b = block_size
  n, k = ids.shape
  layout = _layout(ids, gate.shape[0], b)
  w_slot = jnp.zeros((layout.tokens.shape[0],), _F32).at[layout.slot].set(
      weights.reshape(-1).astype(_F32), mode="drop", unique_indices=True)
  g32 = g.astype(_F32)

  def block(i, carry):
    d_gate, d_up, d_down, d_x, d_w = carry
    e = layout.expert[i]
    tokens = jax.lax.dynamic_slice_in_dim(layout.tokens, i * b, b)  # [B]; N marks padding
    w = jax.lax.dynamic_slice_in_dim(w_slot, i * b, b)
    xb = jnp.take(x, tokens, axis=0, mode="fill", fill_value=0)  # [B, D]
    gb = jnp.take(g32, tokens, axis=0, mode="fill", fill_value=0)  # [B, D]
    y, vjp = jax.vjp(_expert, xb, gate[e], up[e], down[e])
    dxb, dge, due, dde = vjp(gb * w[:, None])
    d_gate = jax.lax.dynamic_update_index_in_dim(d_gate, d_gate[e] + dge, e, 0)
    d_up = jax.lax.dynamic_update_index_in_dim(d_up, d_up[e] + due, e, 0)
    d_down = jax.lax.dynamic_update_index_in_dim(d_down, d_down[e] + dde, e, 0)
    d_x = d_x.at[tokens].add(dxb.astype(_F32), mode="drop")
    d_w = jax.lax.dynamic_update_slice_in_dim(d_w, (gb * y).sum(-1), i * b, 0)
    return d_gate, d_up, d_down, d_x, d_w

  zeros = lambda a: jnp.zeros(a.shape, _F32)  # noqa: E731
  init = (zeros(gate), zeros(up), zeros(down), jnp.zeros((n, x.shape[1]), _F32),
          jnp.zeros_like(w_slot))
  d_gate, d_up, d_down, d_x, d_w = jax.lax.fori_loop(0, layout.used_blocks, block, init)
  # An assignment's weight gradient sits in its slot; foreign ones have none (zero).
  own = layout.slot < layout.tokens.shape[0]
  d_weights = jnp.where(own, d_w[jnp.minimum(layout.slot, d_w.shape[0] - 1)], 0.0)
  return (d_gate.astype(gate.dtype), d_up.astype(up.dtype), d_down.astype(down.dtype),
          d_x.astype(x.dtype), d_weights.reshape(n, k).astype(weights.dtype), None)


sorted_blocks.defvjp(_forward, _backward)


def _expert(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """One expert on a block of rows, as the forward kernel computes it: float32
  accumulation, the SwiGLU hidden in x.dtype. x: [B, D] -> [B, D] float32."""
  h = (jax.nn.silu(_dot("bd,df->bf", x, gate)) * _dot("bd,df->bf", x, up)).astype(x.dtype)
  return _dot("bf,fd->bd", h, down)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  # XLA:CPU cannot run some bf16 x bf16 -> f32 dots (see moe_kernels._einsum).
  if moe_kernels.target_platform() == "cpu":
    a, b = a.astype(_F32), b.astype(_F32)
  return jnp.einsum(spec, a, b, preferred_element_type=_F32)


class _Layout(NamedTuple):
  """Assignments grouped by expert into blocks of B slots, each block one expert's (the
  forward kernel's layout, rebuilt: its blocks are internal to it)."""
  slot: jax.Array  # [R] slot of each assignment (n·K + k order); past the end if foreign
  tokens: jax.Array  # [P] token of each slot, N for padding
  expert: jax.Array  # [P / B] expert of each block
  used_blocks: jax.Array  # blocks that hold rows (dynamic)


def _layout(ids: jax.Array, num_experts: int, b: int) -> _Layout:
  n, k = ids.shape
  rows = n * k
  num_blocks = (rows + min(rows, num_experts) * (b - 1)) // b
  padded = num_blocks * b
  flat = ids.reshape(-1)
  valid = (flat >= 0) & (flat < num_experts)
  key = jnp.where(valid, flat, num_experts).astype(jnp.int32)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)[:num_experts]
  group = -(-counts // b) * b  # each expert's rows rounded up to whole blocks
  group_start = jnp.cumsum(group) - group
  # Rank of each assignment among its expert's (stable): its offset in the group.
  order = jnp.argsort(key, stable=True)
  rank = jnp.zeros(rows, jnp.int32).at[order].set(
      jnp.arange(rows, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[
          jnp.minimum(key[order], num_experts - 1)])
  slot = jnp.where(valid, group_start[jnp.minimum(key, num_experts - 1)] + rank,
                   padded + jnp.arange(rows, dtype=jnp.int32))
  tokens = jnp.full((padded,), n, jnp.int32).at[slot].set(
      jnp.arange(rows, dtype=jnp.int32) // k, mode="drop", unique_indices=True)
  group_end = jnp.cumsum(group)
  expert = jnp.minimum(
      jnp.searchsorted(group_end, jnp.arange(num_blocks, dtype=jnp.int32) * b, side="right"),
      num_experts - 1).astype(jnp.int32)
  return _Layout(slot, tokens, expert, group_end[-1] // b)
