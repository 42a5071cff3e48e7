"""Parameter constructors that attach logical axis names to every weight.

Eager sharding is off: a model is built on one device (or abstractly) and placed on a
mesh later through `smallfour.sharding`'s rule table.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour import sharding


def _check_axes(shape: Sequence[int], axes: Sequence[str]) -> None:
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  if unknown := [a for a in axes if a not in sharding.LOGICAL_AXIS_NAMES]:
    raise ValueError(f"logical axes {unknown} are not in sharding.LOGICAL_AXIS_RULES")


def weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], *, fan_in: int,
           dtype: jnp.dtype) -> nnx.Param:
  """A matrix-like weight drawn from N(0, 1/fan_in)."""
  _check_axes(shape, axes)
  value = jax.random.normal(rngs.params(), tuple(shape), jnp.float32) * fan_in**-0.5
  return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


def ones(shape: Sequence[int], axes: Sequence[str], dtype: jnp.dtype) -> nnx.Param:
  _check_axes(shape, axes)
  return nnx.Param(jnp.ones(tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)
