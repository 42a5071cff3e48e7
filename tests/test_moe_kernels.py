"""The routed-expert kernels against the dense one-hot oracle (`moe.dense_oracle`).

Kernels are jitted once at module level so that tests sharing a shape share a compile:
compiling, not running, is what this file spends its time on.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smallfour.configs import tiny as tiny_preset
from smallfour.nn import moe, moe_kernels

KERNELS = sorted(moe_kernels.KERNELS)
JITTED = {name: jax.jit(kernel) for name, kernel in moe_kernels.KERNELS.items()}
oracle = jax.jit(moe.dense_oracle)
D, F = 16, 8  # hidden and expert width: small, the kernels' logic does not depend on them


def make_experts(num_experts: int, seed: int = 0,
                 param_dtype: jnp.dtype = jnp.float32) -> moe.RoutedExperts:
  """A RoutedExperts module with N(0, 1/fan_in) weights drawn by numpy (eager jax random
  init compiles per shape, which dominated this file's run time)."""
  cfg = tiny_preset.get_config().replace(
      num_experts=num_experts, hidden_size=D, moe_intermediate_size=F, n_group=1,
      topk_group=1)
  experts = nnx.eval_shape(
      lambda: moe.RoutedExperts(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  rng = np.random.default_rng(seed)
  for param in (experts.gate_proj, experts.up_proj, experts.down_proj):
    shape = param.get_value().shape
    param.set_value(jnp.asarray(rng.standard_normal(shape) * shape[1]**-0.5, param_dtype))
  return experts


def arrays(experts: moe.RoutedExperts) -> tuple[jax.Array, jax.Array, jax.Array]:
  return experts.gate_proj[...], experts.up_proj[...], experts.down_proj[...]


def routing(n: int, e: int, k: int, seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [N, D], weights [N, K] (some negative: any value must pass through unchanged) and
  distinct top-k ids [N, K] of random logits."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
  weights = jnp.asarray(rng.uniform(-0.5, 1.5, (n, k)), jnp.float32)
  ids = jnp.asarray(np.argsort(-rng.standard_normal((n, e)), axis=1)[:, :k], jnp.int32)
  return x, weights, ids


def assert_close(got, want, rel: float = 1e-5):
  """Equal up to `rel` of the output's scale."""
  want = np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=rel * scale, rtol=0)


# Every N, E and K of interest, with N·K from 1 row to 1200 and from below to far above E.
SHAPES = [(1, 4, 1), (1, 16, 4), (3, 8, 2), (3, 4, 4), (64, 16, 4), (64, 4, 1), (300, 8, 2)]


@pytest.mark.parametrize("n,e,k", SHAPES)
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_matches_oracle(name, n, e, k):
  experts = make_experts(e, seed=n + e + k)
  x, weights, ids = routing(n, e, k, seed=n * e * k)
  got = JITTED[name](*arrays(experts), x, weights, ids)
  assert got.shape == (n, D) and got.dtype == jnp.float32
  assert_close(got, oracle(experts, x, weights, ids))


@pytest.mark.parametrize("name", KERNELS)
def test_dropless_when_every_token_picks_the_same_experts(name):
  n, e, k = 300, 8, 2
  experts = make_experts(e, seed=1)
  x, weights, _ = routing(n, e, k, seed=2)
  # All 600 rows on two experts, then all 600 on one (each token listing it twice), far
  # past the mean of 75 rows per expert a capacity buffer would be sized for.
  for pick in ([5, 2], [7, 7]):
    ids = jnp.tile(jnp.asarray(pick, jnp.int32), (n, 1))
    assert_close(JITTED[name](*arrays(experts), x, weights, ids),
                 oracle(experts, x, weights, ids))


@pytest.mark.parametrize("name", KERNELS)
def test_foreign_ids_contribute_zero(name):
  n, e, k = 64, 16, 4
  experts = make_experts(e, seed=3)
  x, weights, ids = routing(n, e, k, seed=4)
  rng = np.random.default_rng(5)
  foreign = jnp.asarray(rng.choice([-1, e, e + 3, -7], (n, k)), jnp.int32)
  mixed = jnp.where(jnp.asarray(rng.random((n, k)) < 0.5), foreign, ids)
  kernel = functools.partial(JITTED[name], *arrays(experts), x, weights)
  assert_close(kernel(mixed), oracle(experts, x, jnp.where(mixed == ids, weights, 0.0), ids))
  np.testing.assert_array_equal(kernel(foreign), 0.0)


@pytest.mark.parametrize("name", KERNELS)
def test_expert_shards_sum_to_the_whole(name):
  """How a shard uses a kernel: its slice of experts, ids offset, the rest foreign."""
  n, e, k, shards = 64, 16, 4, 4
  experts = make_experts(e, seed=6)
  x, weights, ids = routing(n, e, k, seed=7)
  local = e // shards
  total = 0.0
  for s in range(shards):
    offset = ids - s * local
    local_ids = jnp.where((offset >= 0) & (offset < local), offset, -1)
    sliced = [a[s * local:(s + 1) * local] for a in arrays(experts)]
    total = total + JITTED[name](*sliced, x, weights, local_ids)
  assert_close(total, oracle(experts, x, weights, ids))


@pytest.mark.parametrize("name", KERNELS)
def test_bfloat16(name):
  n, e, k = 64, 16, 4
  experts = make_experts(e, seed=8, param_dtype=jnp.bfloat16)
  x, weights, ids = routing(n, e, k, seed=9)
  x = x.astype(jnp.bfloat16)
  got = JITTED[name](*arrays(experts), x, weights, ids)
  assert got.dtype == jnp.bfloat16
  # The float32 oracle on the same (bf16-representable) values.
  f32 = [a.astype(jnp.float32) for a in arrays(experts)]
  want = JITTED["dense"](*f32, x.astype(jnp.float32), weights, ids)
  assert_close(got, want, rel=3e-2)


@pytest.mark.parametrize("block_size", [1, 3, 512])
def test_sorted_blocks_any_block_size(block_size):
  n, e, k = 64, 16, 4
  experts = make_experts(e, seed=10)
  x, weights, ids = routing(n, e, k, seed=11)
  kernel = jax.jit(functools.partial(moe_kernels.sorted_blocks, block_size=block_size))
  assert_close(kernel(*arrays(experts), x, weights, ids), oracle(experts, x, weights, ids))


def test_default_block_size():
  assert [moe_kernels.default_block_size(r, 64) for r in (4, 64, 256, 2048, 4096, 10**6)] == [
      1, 1, 4, 32, 64, 64]


def test_routed_experts_dispatch():
  experts = make_experts(8, seed=14)
  x, weights, ids = routing(3, 8, 2, seed=15)
  want = oracle(experts, x, weights, ids)
  dispatch = jax.jit(moe.routed_experts, static_argnames="impl")
  for impl in ["auto", "dense_oracle", *KERNELS]:
    assert_close(dispatch(experts, x, weights, ids, impl=impl), want)
  with pytest.raises(ValueError, match="unknown MoE implementation"):
    moe.routed_experts(experts, x, weights, ids, impl="nope")


def test_select_kernel():
  # XLA:CPU, by measurement (benchmarks/moe_kernels.py): sorted_blocks, even for decode.
  for n in (2, 8, 64, 1024, 100_000):
    assert moe_kernels.select_kernel(n, "cpu") == "sorted_blocks"
  assert moe_kernels.select_kernel(1, "cpu") == (
      "gather" if moe_kernels.CPU_GATHER_MAX_TOKENS >= 1 else "sorted_blocks")
  for backend in ("gpu", "tpu"):  # decode reads only the experts it uses; prefill groups
    for n in (1, moe_kernels.LOOP_MAX_TOKENS):
      assert moe_kernels.select_kernel(n, backend) == "expert_loop"
    assert moe_kernels.select_kernel(moe_kernels.LOOP_MAX_TOKENS + 1, backend) == "ragged_dot"
