"""The multimodal projector: RMSNorm, 2×2 patch merger, GELU MLP (spec §5.4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour.config import VisionConfig
from smallfour.nn import params
from smallfour.nn.norm import RMSNorm


class Projector(nnx.Module):
  """Encoder patches -> text-width image rows, one per merge×merge block of patches.

  Each block's patches become one vector of `merge²·Dv` channels, **channel-major**
  (`v[c·m² + k] = patch_k[c]`, k the block's patches in row-major order: torch's
  `unfold` order, which `merging_layer` expects), then `merging_layer` (no bias) brings
  it back to Dv and `linear_1` → exact GELU → `linear_2` (no biases) to the text width.
  """

  def __init__(self, cfg: VisionConfig, text_hidden: int, *, rngs: nnx.Rngs,
               param_dtype: jnp.dtype):
    dv, m2 = cfg.hidden_size, cfg.spatial_merge_size**2
    w = lambda shape, axes, fan_in: params.weight(  # noqa: E731
        rngs, shape, axes, fan_in=fan_in, dtype=param_dtype)
    self.norm = RMSNorm(dv, eps=cfg.projector_norm_eps, param_dtype=param_dtype)
    self.merging_layer = w((dv * m2, dv), ("vision_merge", "vision_embed"), dv * m2)
    self.linear_1 = w((dv, text_hidden), ("vision_embed", "projector_hidden"), dv)
    self.linear_2 = w((text_hidden, text_hidden), ("projector_hidden", "embed"), text_hidden)

  def __call__(self, x: jax.Array, merge_index: jax.Array) -> jax.Array:
    """x: [N, Dv] encoder output; merge_index: [M, merge²] the patches of each block (rows
    of `x`, row-major within the block). Returns [M, D]."""
    blocks = jnp.take(self.norm(x), merge_index, axis=0)  # [M, m², Dv]
    merged = blocks.transpose(0, 2, 1).reshape(merge_index.shape[0], -1) @ self.merging_layer[...]
    hidden = jax.nn.gelu(merged @ self.linear_1[...], approximate=False)
    return hidden @ self.linear_2[...]
