"""Integer weights are dequantized inside the matmul, never into a whole bf16 copy:
programs compiled by XLA:TPU (libtpu, for an abstract v5e chip) need no temporary of a
weight's size, for a dense matmul and for the MoE kernels a TPU runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from smallfour.nn import fp8, moe_kernels, quant

FORMATS = [("int8", None), ("int4", 128)]


@pytest.fixture(scope="module")
def chip():
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  return jax.sharding.Mesh(np.array(devices[:1]), ("x",))


def _temp_bytes(mesh, fn, *args) -> int:
  on_chip = lambda a: jax.ShapeDtypeStruct(  # noqa: E731
      a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn).lower(*jax.tree.map(on_chip, args)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _weight(shape, qtype, group):
  return jax.eval_shape(
      lambda: quant.quantize("w", jnp.zeros(shape, jnp.float32), (-2,), qtype, group))


@pytest.mark.parametrize("qtype,group", FORMATS)
def test_dense_matmul(chip, qtype, group):
  """x [8, 4096] @ w [4096, 8192]: the bf16 weight would be 64 MiB; nothing is kept.
  (With int4 codes held [D, F] instead of [D/g, g, F] XLA kept a 134 MB float32 copy.)"""
  w = _weight((4096, 8192), qtype, group)
  x = jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16)
  assert _temp_bytes(chip, lambda x, w: x @ fp8.dense(w, x.dtype), x, w) < 2**20


@pytest.mark.parametrize("qtype,group", FORMATS)
@pytest.mark.parametrize("kernel,tokens", [("expert_loop", 8), ("ragged_dot", 512)])
def test_moe_kernels(chip, qtype, group, kernel, tokens):
  """16 experts of 2048 x 1024 (bf16: 192 MiB for the three projections), the kernels
  `moe_kernels.select_kernel` picks on TPU for decode and prefill."""
  e, d, f = 16, 2048, 1024
  weights = [_weight(s, qtype, group) for s in ((e, d, f), (e, d, f), (e, f, d))]
  routing = [jax.ShapeDtypeStruct(s, t) for s, t in (
      ((tokens, d), jnp.bfloat16), ((tokens, 4), jnp.float32), ((tokens, 4), jnp.int32))]
  assert moe_kernels.select_kernel(tokens, "tpu") == kernel
  temp = _temp_bytes(chip, moe_kernels.KERNELS[kernel], *weights, *routing)
  assert temp < 2**20, temp
