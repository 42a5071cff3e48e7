"""YaRN rotary embedding with interleaved pairs, and the llama-4 query scale.

Spec §2.4–2.5. Rotary channel pairs are adjacent, `(x[2i], x[2i+1])`, and stay
interleaved in our outputs: q and k are rotated alike, so every dot product equals the
reference's (which de-interleaves), and checkpoint weights are used unpermuted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smallfour.config import RopeConfig


def yarn_inv_freq(rope_dim: int, rope: RopeConfig) -> np.ndarray:
  """Inverse frequencies `[rope_dim // 2]`, float32, blended between extra- and interpolation.

  Pairs below `low` keep the original frequency, those above `high` are divided by
  `factor`, those between blend linearly. The correction bounds use
  `original_max_position_embeddings`, in float64 as the reference does.
  """

  def correction_dim(rotations: float) -> float:
    return (rope_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta)))

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rope_dim - 1)
  if low == high:
    high += 0.001  # the reference's guard against a zero-width ramp

  pos_freqs = np.float32(rope.theta) ** (np.arange(0, rope_dim, 2, dtype=np.float32) / rope_dim)
  extrapolation = np.float32(1.0) / pos_freqs
  interpolation = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
  ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  ramp = ramp.astype(np.float32)
  return (interpolation * ramp + extrapolation * (1 - ramp)).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float,
                dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """positions: [B, S] int -> (cos, sin): [B, S, rope_dim // 2] in `dtype`.

  Angles are computed in float32 and the tables cast once, as the reference does.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(angles) * attention_factor
  sin = jnp.sin(angles) * attention_factor
  return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs.

  x: [B, S, rope_dim] or [B, S, H, rope_dim]; cos, sin: [B, S, rope_dim // 2].
  """
  if x.ndim == 4:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape)


def llama4_query_scale(positions: jax.Array, beta: float, original_max: int) -> jax.Array:
  """positions: [B, S] -> λ(p) = 1 + β·ln(1 + floor(p / original_max)): [B, S] float32."""
  blocks = jnp.floor(positions.astype(jnp.float32) / original_max)
  return 1.0 + beta * jnp.log(1.0 + blocks)


class PositionEncoding(NamedTuple):
  """What attention needs of the token positions, computed once per forward pass."""

  cos: jax.Array  # [B, S, rope_dim // 2], activation dtype
  sin: jax.Array  # [B, S, rope_dim // 2], activation dtype
  query_scale: jax.Array  # [B, S], λ(p) cast to the activation dtype


def encode_positions(positions: jax.Array, rope_dim: int, rope: RopeConfig,
                     dtype: jnp.dtype) -> PositionEncoding:
  """positions: [B, S] absolute 0-based positions -> PositionEncoding."""
  cos, sin = rope_tables(positions, yarn_inv_freq(rope_dim, rope), rope.attention_factor, dtype)
  scale = llama4_query_scale(positions, rope.llama_4_scaling_beta,
                             rope.llama_4_original_max_position_embeddings)
  return PositionEncoding(cos, sin, scale.astype(dtype))
