"""Parameter constructors that attach logical axis names to every weight.

Eager sharding is off: a model is built on one device (or abstractly) and placed on a
mesh later through `smallfour.sharding`'s rule table. An FP8-resident weight's scale
carries the logical axes of the weight's leading axes, so per-expert scales are split
with their experts.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour import sharding
from smallfour.nn import fp8


def _check_axes(shape: Sequence[int], axes: Sequence[str]) -> None:
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  if unknown := [a for a in axes if a not in sharding.LOGICAL_AXIS_NAMES]:
    raise ValueError(f"logical axes {unknown} are not in sharding.LOGICAL_AXIS_RULES")


def weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], *, fan_in: int,
           dtype: jnp.dtype, fp8_scales: int | None = None) -> nnx.Param | fp8.Fp8Weight:
  """A matrix-like weight drawn from N(0, 1/fan_in).

  With `fp8_scales` (the number of leading axes that get their own multiplier: 0 for
  one per tensor, 1 for one per expert) it is held FP8-resident (`fp8.Fp8Weight`):
  absmax-quantized here, replaced by the checkpoint's codes and scales on restore.
  """
  _check_axes(shape, axes)
  value = jax.random.normal(rngs.params(), tuple(shape), jnp.float32) * fan_in**-0.5
  if fp8_scales is None:
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)
  q = fp8.quantize(value, fp8_scales)
  return fp8.Fp8Weight(
      nnx.Param(q.codes, out_sharding=tuple(axes), eager_sharding=False),
      nnx.Param(q.scale, out_sharding=tuple(axes[:fp8_scales]), eager_sharding=False), dtype)


def ones(shape: Sequence[int], axes: Sequence[str], dtype: jnp.dtype) -> nnx.Param:
  _check_axes(shape, axes)
  return nnx.Param(jnp.ones(tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)
