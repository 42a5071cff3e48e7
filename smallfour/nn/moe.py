"""Mixture of experts: float32 router, stacked routed experts, shared experts (spec §3).

Routed expert weights are stacked arrays `[E, ...]` in one module, never E submodules,
so that their expert axis can be split over the `expert` mesh axis. The routed
computation sits behind `routed_experts`, which dispatches to an exact (dropless)
kernel; `dense_oracle` evaluates every expert on every token and is the reference the
faster kernels are tested against.

Names: N tokens, D hidden, E routed experts, K experts per token, F expert width.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour.config import TextConfig
from smallfour.nn import expert_parallel, fp8, moe_kernels, params

_F32 = jnp.float32


class MLP(nnx.Module):
  """SwiGLU `down(silu(gate·x) ⊙ up·x)`: the shared experts and the dense layers."""

  def __init__(self, hidden: int, width: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
               fp8: bool = False):
    """`fp8`: the three projections are held FP8-resident (`params.weight`)."""
    w = lambda shape, axes, fan_in: params.weight(  # noqa: E731
        rngs, shape, axes, fan_in=fan_in, dtype=param_dtype, fp8_scales=0 if fp8 else None)
    self.gate_proj = w((hidden, width), ("embed", "mlp"), hidden)
    self.up_proj = w((hidden, width), ("embed", "mlp"), hidden)
    self.down_proj = w((width, hidden), ("mlp", "embed"), width)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D]."""
    hidden = (jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...]))
    return hidden @ self.down_proj[...]


class Router(nnx.Module):
  """Softmax router with group-limited top-k, computed in float32."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
    self.kernel = params.weight(rngs, (cfg.hidden_size, cfg.num_experts),
                                ("embed", "router_expert"), fan_in=cfg.hidden_size,
                                dtype=param_dtype)
    self.top_k = cfg.num_experts_per_tok
    self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
    self.norm_topk_prob = cfg.norm_topk_prob
    self.routed_scaling_factor = cfg.routed_scaling_factor
    # Off, so that inference and training trace nothing extra; `router_trace.trace` turns
    # it on for one pass and collects what is sown with `nnx.capture`.
    self.record = False

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [N, D] -> (weights [N, K] float32, expert ids [N, K] int32).

    With `record` set, also sows (`nnx.Intermediate`) "scores" [N, E] (the softmax over
    all routed experts), "choices" (the ids) and "weights".
    """
    logits = jnp.einsum("nd,de->ne", x.astype(_F32), self.kernel[...].astype(_F32))
    scores = jax.nn.softmax(logits, axis=-1)
    choice = scores
    if self.topk_group < self.n_group:
      n, e = scores.shape
      grouped = scores.reshape(n, self.n_group, e // self.n_group)
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
      _, kept = jax.lax.top_k(group_scores, self.topk_group)
      keep = jnp.zeros_like(group_scores, bool).at[jnp.arange(n)[:, None], kept].set(True)
      # Zero (not -inf) outside the kept groups, as the reference does.
      choice = jnp.where(keep[:, :, None], grouped, 0.0).reshape(n, e)
    _, ids = jax.lax.top_k(choice, self.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if self.norm_topk_prob:
      weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights, ids = weights * self.routed_scaling_factor, ids.astype(jnp.int32)
    if self.record:
      self.sow(nnx.Intermediate, "scores", scores)
      self.sow(nnx.Intermediate, "choices", ids)
      self.sow(nnx.Intermediate, "weights", weights)
    return weights, ids


class RoutedExperts(nnx.Module):
  """E SwiGLU experts stored as stacked `[E, D, F]` / `[E, F, D]` arrays.

  FP8-resident (`fp8`), each expert has its own multiplier, as released.
  """

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
               fp8: bool = False):
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    w = lambda shape, axes, fan_in: params.weight(  # noqa: E731
        rngs, shape, axes, fan_in=fan_in, dtype=param_dtype, fp8_scales=1 if fp8 else None)
    self.gate_proj = w((e, d, f), ("expert", "embed", "expert_mlp"), d)
    self.up_proj = w((e, d, f), ("expert", "embed", "expert_mlp"), d)
    self.down_proj = w((e, f, d), ("expert", "expert_mlp", "embed"), f)

  def stacked(self) -> tuple[jax.Array | fp8.Fp8Array, ...]:
    """(gate, up, down) as the kernels take them: arrays, or FP8 codes with scales."""
    return fp8.packed(self.gate_proj), fp8.packed(self.up_proj), fp8.packed(self.down_proj)


def dense_oracle(experts: RoutedExperts, x: jax.Array, weights: jax.Array,
                 ids: jax.Array) -> jax.Array:
  """Runs every expert on every token and keeps the routed ones: exact, O(N·E) work.

  x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  gate = jnp.einsum("nd,edf->nef", x, experts.gate_proj[...])
  up = jnp.einsum("nd,edf->nef", x, experts.up_proj[...])
  out = jnp.einsum("nef,efd->ned", jax.nn.silu(gate) * up, experts.down_proj[...])
  num_experts = experts.gate_proj[...].shape[0]
  combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(ids, num_experts, dtype=_F32))
  return jnp.einsum("ne,ned->nd", combine.astype(x.dtype), out)


MoeKernel = Callable[[RoutedExperts, jax.Array, jax.Array, jax.Array], jax.Array]


def _on_module(kernel: moe_kernels.Kernel) -> MoeKernel:
  """An array kernel of `moe_kernels` applied to the module's stacked weights."""

  def run(experts: RoutedExperts, x: jax.Array, weights: jax.Array,
          ids: jax.Array) -> jax.Array:
    return kernel(*experts.stacked(), x, weights, ids)

  return run


KERNELS: dict[str, MoeKernel] = {
    "dense_oracle": dense_oracle,
    **{name: _on_module(kernel) for name, kernel in moe_kernels.KERNELS.items()},
}


IMPLS = ("auto", "expert_parallel", *KERNELS)


def _mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set with `jax.set_mesh` (None when absent or a single device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def routed_experts(experts: RoutedExperts, x: jax.Array, weights: jax.Array, ids: jax.Array,
                   impl: str = "auto") -> jax.Array:
  """The routed expert sum `Σ_k w_k · expert_{id_k}(x)` with the implementation `impl`.

  "auto": expert-parallel under a multi-device mesh (`jax.set_mesh`), else the local
  kernel `moe_kernels.select_kernel` picks by backend and token count. "expert_parallel"
  forces the shard_map path (with the auto local kernel); a kernel name runs that kernel
  on the whole (possibly sharded) arrays and leaves partitioning to the compiler. All
  choices are static, made at trace time.
  x: [N, D], weights/ids: [N, K] -> [N, D].
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown MoE implementation {impl!r}; known: {sorted(IMPLS)}")
  mesh = _mesh()
  if impl == "auto":
    impl = ("expert_parallel" if mesh is not None
            else moe_kernels.select_kernel(x.shape[0], moe_kernels.target_platform()))
  if impl == "expert_parallel":
    if mesh is None:
      raise ValueError("the expert_parallel MoE needs a multi-device mesh (jax.set_mesh)")
    return expert_parallel.routed_experts(*experts.stacked(), x, weights, ids, mesh=mesh)
  return KERNELS[impl](experts, x, weights, ids)


def set_impl(model: nnx.Module, impl: str) -> None:
  """Selects the routed-expert implementation of every MoE layer in `model`."""
  if impl not in IMPLS:
    raise ValueError(f"unknown MoE implementation {impl!r}; known: {sorted(IMPLS)}")
  for _, module in nnx.iter_graph(model):
    if isinstance(module, MoE):
      module.impl = impl


class MoE(nnx.Module):
  """Routed experts plus unweighted shared experts: `Σ_k w_k·E_k(x) + shared(x)`."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
               fp8: bool = False):
    """`fp8`: experts and shared experts FP8-resident; the router stays in param_dtype."""
    self.router = Router(cfg, rngs=rngs, param_dtype=param_dtype)
    self.experts = RoutedExperts(cfg, rngs=rngs, param_dtype=param_dtype, fp8=fp8)
    self.shared_experts = (
        MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs,
            param_dtype=param_dtype, fp8=fp8) if cfg.n_shared_experts else None)
    self.impl = "auto"  # see routed_experts; change with set_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, S, D] -> [B, S, D]."""
    flat = x.reshape(-1, x.shape[-1])
    weights, ids = self.router(flat)
    out = routed_experts(self.experts, flat, weights, ids, self.impl).reshape(x.shape)
    if self.shared_experts is not None:
      out = out + self.shared_experts(x)
    return out
