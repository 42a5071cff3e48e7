"""Expert parallelism: the routed experts under `jax.shard_map` over the mesh (spec §3).

Each device holds E/expert experts (and, with `tensor` > 1, a slice of their width F).
Tokens arrive split over (data, expert) like every activation; inside the map

  1. the rows of the data group are gathered over `expert` (all_gather), with their
     routing weights and ids, so every expert shard sees every token it might serve;
  2. each shard runs one exact local kernel of `moe_kernels` on its own experts: ids are
     shifted into the local range and the ones it does not own fall outside it, so they
     cost nothing (sorted_blocks skips them) and contribute zero;
  3. the partial sums are added over `tensor` (F slices) and reduce-scattered back over
     `expert` (psum_scatter), so every device ends with the full sum for its own rows.

This is the all-gather form DESIGN.md chose because it runs on XLA:CPU (and so is tested
here); `ragged_all_to_all` dispatch is a GPU/TPU-only refinement. Communication per
layer: all_gather + reduce_scatter of [N/data, D] activations, weights never move.

Names: N tokens, D hidden, E experts (global), K experts per token, F expert width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from smallfour import sharding
from smallfour.nn import fp8, moe_kernels

ROW_AXES = ("batch", "embed")  # x [N, D]: tokens split like every batch axis
IN_WEIGHT_AXES = ("expert", "embed", "expert_mlp")  # gate/up [E, D, F]
OUT_WEIGHT_AXES = ("expert", "expert_mlp", "embed")  # down [E, F, D]


def routed_experts(gate: moe_kernels.Weight, up: moe_kernels.Weight,
                   down: moe_kernels.Weight, x: jax.Array,
                   weights: jax.Array, ids: jax.Array, *,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                   kernel: str = "auto") -> jax.Array:
  """`Σ_k w_k · expert_{id_k}(x)` with experts split over `mesh`'s expert axis.

  gate/up: [E, D, F], down: [E, F, D] (global, sharded by the rule table; FP8-resident
  ones travel as codes with their per-expert scales, split alike);
  x: [N, D]; weights/ids: [N, K]. `kernel` names the local kernel ("auto": by backend
  and local row count). Returns [N, D] in x.dtype.
  """
  n, k = ids.shape
  num_experts = gate.shape[0]
  row_spec = sharding.logical_spec(ROW_AXES)  # P(("data", "expert"), None) by the table
  row_axes = (row_spec[0],) if isinstance(row_spec[0], str) else tuple(row_spec[0] or ())
  if "expert" not in row_axes:
    raise ValueError(f"the rule table must split `batch` over `expert` for this MoE: {row_spec}")
  groups = 1
  for axis in row_axes:
    groups *= mesh.shape[axis]
  pad = -n % groups
  if pad:  # padding rows own no expert (id -1): no work, zero output, sliced off below
    x = jnp.pad(x, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    ids = jnp.pad(ids, ((0, pad), (0, 0)), constant_values=-1)
  tokens = (n + pad) // (groups // mesh.shape["expert"])  # gathered per shard
  if kernel == "auto":
    kernel = moe_kernels.select_kernel(tokens, moe_kernels.target_platform())
  local_kernel = moe_kernels.KERNELS[kernel]
  if kernel == "sorted_blocks":  # blocks sized for the global expert count, as unsharded
    local_kernel = functools.partial(
        local_kernel, block_size=moe_kernels.default_block_size(tokens * k, num_experts))

  def shard(gate, up, down, x, weights, ids):
    x, weights, ids = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                       for a in (x, weights, ids))
    first = jax.lax.axis_index("expert") * gate.shape[0]
    out = local_kernel(gate, up, down, x, weights, ids - first)
    out = jax.lax.psum(out, "tensor")
    return jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)

  def weight_spec(w, axes):
    spec = sharding.logical_spec(axes)
    if hasattr(w, "partition_spec"):  # integer codes and scales (quant.IntArray)
      return w.partition_spec(spec)
    return fp8.Fp8Array(spec, P(spec[0])) if isinstance(w, fp8.Fp8Array) else spec

  in_spec, out_spec = weight_spec(gate, IN_WEIGHT_AXES), weight_spec(down, OUT_WEIGHT_AXES)
  # check_vma=False: the local kernels' loop carries start as fresh zeros, which the
  # varying-axes checker would make every kernel annotate; the collectives above state
  # the replication explicitly instead.
  out = jax.shard_map(shard, mesh=mesh,
                      in_specs=(in_spec, in_spec, out_spec, row_spec, row_spec, row_spec),
                      out_specs=row_spec, check_vma=False)(gate, up, down, x, weights, ids)
  return out[:n]
