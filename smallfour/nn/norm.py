"""RMSNorm (spec §2.2), shared by every norm of the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour.nn import params


class RMSNorm(nnx.Module):
  """`y = w ⊙ cast(x · rsqrt(mean(x²) + eps))`, statistics in float32.

  The normalised value is cast back to the input dtype *before* the scale, as in the
  reference implementation; the scale is a plain multiplier initialised to ones.
  """

  def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
    self.eps = eps
    self.scale = params.ones((dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., dim] -> [..., dim]."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)
