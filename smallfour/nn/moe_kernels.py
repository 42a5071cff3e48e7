"""Exact (dropless) routed-expert kernels over stacked expert weight arrays.

Every kernel computes, for x: [N, D], weights/ids: [N, K] and stacked SwiGLU experts
gate/up: [E, D, F], down: [E, F, D],

  out[n] = Σ_k weights[n, k] · down[e](silu(x[n] @ gate[e]) ⊙ (x[n] @ up[e])),  e = ids[n, k]

and returns [N, D] in x.dtype. The stacked weights are arrays, or FP8-resident
`fp8.Fp8Array`s (e4m3 codes, one multiplier per expert): those are indexed as codes and
dequantized per use, never as a whole. Assignments whose id is outside [0, E) contribute zero:
under `jax.shard_map` a shard holds a local slice of experts and is handed ids already
offset to its local range, with the ones it does not own set to -1 or E.

The kernels take arrays, not the module, so they can run on such a local slice. They are
jit-compatible with static N, K, E (the routing is dynamic) and never drop a token,
whatever the routing. Matmuls accumulate in float32; the SwiGLU hidden is cast to the
activation dtype before the down projection (the usual mixed-precision contract).

  sorted_blocks  XLA:CPU, every N: rows sorted by expert into fixed-size blocks, one
                 matmul chain per *used* block (dynamic trip count) on that block's
                 expert, so padding blocks and foreign rows cost nothing.
  gather         gathers the K selected experts' weights per token ([N, K, D, F] copies);
                 meant for decode, but on XLA:CPU sorted_blocks is faster even at N=1.
  expert_loop    GPU/TPU decode: one iteration per distinct expert used (a dynamic trip
                 count), on all N rows; reads each used expert once and no other.
  ragged_dot     rows sorted by expert, `jax.lax.ragged_dot` (the GPU/TPU grouped matmul).
  dense          every expert on every row; the oracle's arithmetic, O(N·E).

`select_kernel` picks one by backend and token count; benchmarks/moe_kernels.py measures
them.

Names: N tokens, D hidden, E experts (local), K experts per token, F expert width,
R = N·K assignments (rows), B block size, P padded rows.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from smallfour.nn import fp8

_F32 = jnp.float32

Weight = jax.Array | fp8.Fp8Array
Kernel = Callable[[Weight, Weight, Weight, jax.Array, jax.Array, jax.Array], jax.Array]


def target_platform() -> str:
  """The platform being compiled for: the devices of the mesh set with `jax.set_mesh`,
  else the default backend.

  Not `jax.default_backend()` alone: a plan compiles for TPUs that are not on this
  machine (`smallfour.plan`), under a mesh of their devices, while the default backend
  is the CPU.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  return jax.default_backend() if device is None else device.platform


def _einsum(spec: str, a: jax.Array, b: Weight) -> jax.Array:
  """einsum of activations `a` and a weight `b`, accumulating in, and returning, float32.

  XLA:CPU (jax 0.10.2) rejects some bf16 x bf16 = f32 dots at run time ("Unsupported element
  type for DotThunk"), so there narrower operands are widened first (it would widen them
  internally anyway); GPU/TPU accumulate bf16 products in float32 natively. An FP8 weight
  is dequantized to the activations' dtype inside the expression, which XLA fuses into
  the dot.
  """
  b = fp8.dense(b, a.dtype)
  if target_platform() == "cpu":
    a, b = a.astype(_F32), b.astype(_F32)
  return jnp.einsum(spec, a, b, preferred_element_type=_F32)


def _swiglu(x: jax.Array, gate: Weight, up: Weight, spec: str) -> jax.Array:
  """silu(x·gate) ⊙ (x·up) with float32 accumulation, in x.dtype."""
  return (jax.nn.silu(_einsum(spec, x, gate)) * _einsum(spec, x, up)).astype(x.dtype)


def _valid(ids: jax.Array, num_experts: int) -> jax.Array:
  return (ids >= 0) & (ids < num_experts)


def _combine(weights: jax.Array, ids: jax.Array, num_experts: int, rows: jax.Array,
             dtype: jnp.dtype) -> jax.Array:
  """Σ_k w[n, k]·rows[n, k] over valid ids. rows: [N, K, D] -> [N, D] in dtype.

  `where`, not a multiply by the mask, so a foreign row never leaks (not even a NaN).
  """
  w = jnp.where(_valid(ids, num_experts), weights.astype(_F32), 0.0)
  rows = jnp.where(_valid(ids, num_experts)[..., None], rows, 0)
  return jnp.einsum("nk,nkd->nd", w, rows, preferred_element_type=_F32).astype(dtype)


def dense(gate: Weight, up: Weight, down: Weight, x: jax.Array, weights: jax.Array,
          ids: jax.Array) -> jax.Array:
  """Every expert on every token, then keep the routed ones. O(N·E) work.

  gate/up: [E, D, F], down: [E, F, D], x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  num_experts = gate.shape[0]
  hidden = _swiglu(x, gate, up, "nd,edf->nef")  # [N, E, F]
  out = _einsum("nef,efd->ned", hidden, down)
  # one_hot of an id outside [0, E) is all zeros, so foreign ids drop out here.
  combine = jnp.einsum("nk,nke->ne", weights.astype(_F32),
                       jax.nn.one_hot(ids, num_experts, dtype=_F32))
  return jnp.einsum("ne,ned->nd", combine, out).astype(x.dtype)


def gather(gate: Weight, up: Weight, down: Weight, x: jax.Array, weights: jax.Array,
           ids: jax.Array) -> jax.Array:
  """Gathers each token's K experts' weights: [N, K, D, F] copies. For decode (small N).

  Work and memory grow as N·K whole experts, so this only pays while N·K is small.
  gate/up: [E, D, F], down: [E, F, D], x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  num_experts = gate.shape[0]
  safe = jnp.clip(ids, 0, num_experts - 1)  # foreign ids are masked in _combine
  hidden = _swiglu(x, gate[safe], up[safe], "nd,nkdf->nkf")  # [N, K, F]
  rows = _einsum("nkf,nkfd->nkd", hidden, down[safe])
  return _combine(weights, ids, num_experts, rows, x.dtype)


class _Sorted(NamedTuple):
  """Assignments sorted by expert; foreign ids sort last under the key E."""
  order: jax.Array  # [R] assignment index (n·K + k) of each sorted row
  key: jax.Array  # [R] expert of each sorted row, E if foreign
  counts: jax.Array  # [E] rows per expert
  starts: jax.Array  # [E] first sorted row of each expert


def _sort(ids: jax.Array, num_experts: int) -> _Sorted:
  flat = ids.reshape(-1)
  key = jnp.where(_valid(flat, num_experts), flat, num_experts).astype(jnp.int32)
  iota = jnp.arange(flat.shape[0], dtype=jnp.int32)
  key, order = jax.lax.sort((key, iota), num_keys=1, is_stable=True)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)[:num_experts]
  return _Sorted(order, key, counts, jnp.cumsum(counts) - counts)


def default_block_size(num_rows: int, num_experts: int) -> int:
  """Rows per `sorted_blocks` block: the mean rows per expert, rounded down to a power of
  two in [1, 64].

  Each expert with rows pads its group by up to B-1, so B tracks the mean group size;
  past 64 a bigger matmul gains less than the padding costs. Measured on XLA:CPU at the
  decode-benchmark shape (benchmarks/moe_kernels.py), within ~15% of the best block size
  from 1 to 1024 tokens. Under expert sharding pass the global R/E (a shard's mean group),
  not R over the local experts: most of a shard's rows are foreign.
  """
  mean = max(1, num_rows // max(1, num_experts))
  return min(64, 1 << (mean.bit_length() - 1))


def sorted_blocks(gate: Weight, up: Weight, down: Weight, x: jax.Array,
                  weights: jax.Array, ids: jax.Array, *, block_size: int | None = None
                  ) -> jax.Array:
  """Rows sorted by expert, each expert's group padded to whole blocks of B rows.

  Layout (indices only, no activation copies): P = R + min(R, E)·(B-1) static padded
  slots, rounded down to whole blocks, hold every expert's group back to back, each group
  starting on a block boundary, so a block belongs to exactly one expert. Even all R rows
  on one expert fit: dropless for any routing. A while loop then runs one block per
  iteration over the blocks actually used (a dynamic count): gather the block's B token
  rows, SwiGLU through its expert's weights (one expert sliced per block, never a
  [blocks, D, F] gather; XLA:CPU still copies each slice before its dot),
  weight, scatter-add into the [N, D] float32 output. Unused padding blocks cost nothing,
  and neither do foreign rows, so a shard only pays for its own experts' rows.

  Measured on XLA:CPU this beats a capacity buffer + batched einsum by ~2x at prefill: it
  computes ~R·(1 + E·B/(2R)) rows, not E·C, and never materializes [P, D] activations.

  gate/up: [E, D, F], down: [E, F, D], x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  num_experts, d = gate.shape[0], x.shape[1]
  n, k = ids.shape
  rows = n * k
  b = block_size or default_block_size(rows, num_experts)
  # Only experts with rows pad, each by at most B-1; the used slots fill whole blocks.
  num_blocks = (rows + min(rows, num_experts) * (b - 1)) // b
  padded = num_blocks * b

  s = _sort(ids, num_experts)
  group = -(-s.counts // b) * b  # each expert's rows rounded up to whole blocks
  group_end = jnp.cumsum(group)
  expert = jnp.minimum(s.key, num_experts - 1)
  iota = jnp.arange(rows, dtype=jnp.int32)
  own = s.key < num_experts
  # Slot of each sorted row; foreign rows get distinct slots past the end, which the
  # scatters drop (and which keeps their indices unique).
  slot = jnp.where(own, group_end[expert] - group[expert] + iota - s.starts[expert],
                   padded + iota)
  # Padding slots keep token N and weight 0: they gather a zero row and add nothing.
  token_of_slot = jnp.full((padded,), n, jnp.int32).at[slot].set(
      s.order // k, mode="drop", unique_indices=True)
  weight_of_slot = jnp.zeros((padded,), _F32).at[slot].set(
      weights.reshape(-1).astype(_F32)[s.order], mode="drop", unique_indices=True)
  block_expert = jnp.minimum(
      jnp.searchsorted(group_end, jnp.arange(num_blocks, dtype=jnp.int32) * b, side="right"),
      num_experts - 1).astype(jnp.int32)

  def block(i, out):
    e = block_expert[i]
    tokens = jax.lax.dynamic_slice_in_dim(token_of_slot, i * b, b)  # [B]
    w = jax.lax.dynamic_slice_in_dim(weight_of_slot, i * b, b)  # [B]
    xb = jnp.take(x, tokens, axis=0, mode="fill", fill_value=0)  # [B, D]
    h = _swiglu(xb, gate[e], up[e], "bd,df->bf")
    y = _einsum("bf,fd->bd", h, down[e])
    # Not unique: a token may list an expert twice; padding rows (token N) are dropped.
    return out.at[tokens].add(y * w[:, None], mode="drop")

  used_blocks = group_end[-1] // b
  out = jax.lax.fori_loop(0, used_blocks, block, jnp.zeros((n, d), _F32))
  return out.astype(x.dtype)


def expert_loop(gate: Weight, up: Weight, down: Weight, x: jax.Array, weights: jax.Array,
                ids: jax.Array) -> jax.Array:
  """A loop over the distinct experts the rows use, each run on all N rows.

  Decode reads weights, not FLOPs: each used expert's weights are read exactly once
  (sliced out of the stacked arrays, or out of their FP8 codes) and unused ones never,
  while the N - (its rows) rows it computes for nothing cost little at decode's N.
  A grouped matmul (`ragged_dot`) takes every local expert as an operand, and XLA's
  cost analysis charges all of them (16 experts per device per layer on 8 devices, when
  one token uses ~0.5 of them there and 8 tokens ~3.6). XLA counts this loop's body
  once, whatever its trip count at run time.
  gate/up: [E, D, F], down: [E, F, D], x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  num_experts = gate.shape[0]
  n, d = x.shape
  valid = _valid(ids, num_experts)
  safe = jnp.where(valid, ids, 0)
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], ids.shape)
  # combine[n, e]: the weight row n gives expert e (summed if listed twice), 0 if none.
  combine = jnp.zeros((n, num_experts), _F32).at[rows, safe].add(
      jnp.where(valid, weights.astype(_F32), 0.0))
  used = jnp.zeros((num_experts,), bool).at[safe].max(valid)
  order = jnp.argsort(~used, stable=True)  # the used experts first

  def one_expert(i, out):
    e = order[i]
    y = _einsum("nf,fd->nd", _swiglu(x, gate[e], up[e], "nd,df->nf"), down[e])
    w = combine[:, e][:, None]
    return out + jnp.where(w != 0, y * w, 0.0)  # `where`: unrouted rows add nothing

  out = jax.lax.fori_loop(0, used.sum(), one_expert, jnp.zeros((n, d), _F32))
  return out.astype(x.dtype)


def ragged_dot(gate: Weight, up: Weight, down: Weight, x: jax.Array,
               weights: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows sorted by expert through `jax.lax.ragged_dot` grouped matmuls (GPU/TPU path).

  Foreign rows sort last, past the sum of the group sizes, and are masked at the end.
  gate/up: [E, D, F], down: [E, F, D], x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  num_experts = gate.shape[0]
  n, k = ids.shape
  s = _sort(ids, num_experts)
  xs = jnp.where((s.key < num_experts)[:, None], x[s.order // k], 0)  # [R, D]
  g = jax.lax.ragged_dot(xs, fp8.dense(gate, x.dtype), s.counts, preferred_element_type=_F32)
  u = jax.lax.ragged_dot(xs, fp8.dense(up, x.dtype), s.counts, preferred_element_type=_F32)
  h = (jax.nn.silu(g) * u).astype(x.dtype)
  ys = jax.lax.ragged_dot(h, fp8.dense(down, x.dtype), s.counts,
                          preferred_element_type=_F32)  # [R, D]
  y = jnp.zeros_like(ys).at[s.order].set(ys, unique_indices=True).reshape(n, k, -1)
  return _combine(weights, ids, num_experts, y, x.dtype)


KERNELS: dict[str, Kernel] = {
    "gather": gather,
    "expert_loop": expert_loop,
    "sorted_blocks": sorted_blocks,
    "ragged_dot": ragged_dot,
    "dense": dense,
}

# Largest token count routed to `gather` on XLA:CPU: none, because sorted_blocks is at
# least as fast from one token up in benchmarks/moe_kernels.py (gather copies the N·K
# experts' weights before reading them; the loop slices one expert per block).
CPU_GATHER_MAX_TOKENS = 0


# Largest token count routed to `expert_loop` on GPU/TPU: up to a large decode batch.
# Each used expert then runs on all these rows, a few % of the FLOPs of reading it.
LOOP_MAX_TOKENS = 64


def select_kernel(num_rows: int, backend: str) -> str:
  """The kernel for `num_rows` tokens on `backend` ("cpu", "gpu", "tpu", ...).

  GPU/TPU have a native grouped matmul, so ragged_dot, except for decode-sized row
  counts (up to LOOP_MAX_TOKENS), which read weights more than they compute: expert_loop
  reads only the experts used. XLA:CPU emulates ragged_dot, many times slower
  (benchmarks/moe_kernels.py), so there sorted_blocks, or gather up to
  CPU_GATHER_MAX_TOKENS.
  """
  if backend == "cpu":
    return "gather" if num_rows <= CPU_GATHER_MAX_TOKENS else "sorted_blocks"
  return "expert_loop" if num_rows <= LOOP_MAX_TOKENS else "ragged_dot"
