"""The Pixtral vision encoder over a packed sequence of images (spec §5.3).

Images arrive as one sequence of patches, each with its image's index (`segments`) and
its row and column in that image's patch grid. Attention is block-diagonal: a patch
attends to every patch of its own image and to none of another's, so a packed batch
computes exactly what encoding each image alone would. The 2D RoPE turns half of each
head's rotary pairs with the patch's row and half with its column, in transformers'
rotate-half layout (the native checkpoint's q/k rows are permuted into it on conversion,
spec §6.4); positions are the explicit (row, column), so any grid size works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour.config import VisionConfig
from smallfour.nn import params
from smallfour.nn.norm import RMSNorm

_F32 = jnp.float32
# Query rows per attention block: bounds the score tensor at [heads, QUERY_BLOCK, N]
# (a 1540×1540 image has N = 12,100 patches).
QUERY_BLOCK = 1024


def axial_inv_freq(cfg: VisionConfig) -> np.ndarray:
  """[head_dim // 2] float32: the row frequencies (even k) then the column ones (odd k)."""
  hd = cfg.head_dim
  inv_freq = np.float32(1.0) / (np.float32(cfg.rope_theta) ** (
      np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
  return np.concatenate([inv_freq[0::2], inv_freq[1::2]]).astype(np.float32)


def axial_angles(rows: jax.Array, cols: jax.Array, cfg: VisionConfig) -> jax.Array:
  """rows, cols: [N] int -> angles [N, head_dim // 2], float32: rows turn the first
  half of the rotary pairs, columns the second."""
  inv_freq = jnp.asarray(axial_inv_freq(cfg))
  quarter = cfg.head_dim // 4
  return jnp.concatenate([rows.astype(_F32)[:, None] * inv_freq[None, :quarter],
                          cols.astype(_F32)[:, None] * inv_freq[None, quarter:]], axis=-1)


def rotate_half(x: jax.Array, angles: jax.Array) -> jax.Array:
  """x: [N, H, K]; angles [N, K // 2]: channel j turns with j + K/2 by angle j."""
  cos = jnp.cos(angles).astype(x.dtype)[:, None, :]
  sin = jnp.sin(angles).astype(x.dtype)[:, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class VisionAttention(nnx.Module):
  """Bidirectional multi-head attention, block-diagonal over images, no biases."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
    d, h, k = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    w = lambda shape, axes, fan_in: params.weight(  # noqa: E731
        rngs, shape, axes, fan_in=fan_in, dtype=param_dtype)
    self.q_proj = w((d, h, k), ("vision_embed", "vision_heads", "vision_head_dim"), d)
    self.k_proj = w((d, h, k), ("vision_embed", "vision_heads", "vision_head_dim"), d)
    self.v_proj = w((d, h, k), ("vision_embed", "vision_heads", "vision_head_dim"), d)
    self.o_proj = w((h, k, d), ("vision_heads", "vision_head_dim", "vision_embed"), h * k)
    self.scale = k**-0.5

  def __call__(self, x: jax.Array, angles: jax.Array, segments: jax.Array) -> jax.Array:
    """x: [N, D]; angles: [N, K/2]; segments: [N] image index -> [N, D]."""
    q = rotate_half(jnp.einsum("nd,dhk->nhk", x, self.q_proj[...]), angles)
    k = rotate_half(jnp.einsum("nd,dhk->nhk", x, self.k_proj[...]), angles)
    v = jnp.einsum("nd,dhk->nhk", x, self.v_proj[...])

    def attend(q_block, seg_block):  # [Q, H, K], [Q] -> [Q, H, K]
      scores = jnp.einsum("qhk,thk->hqt", q_block, k, preferred_element_type=_F32) * self.scale
      scores = jnp.where(seg_block[None, :, None] == segments[None, None, :], scores, -jnp.inf)
      probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
      return jnp.einsum("hqt,thk->qhk", probs, v)

    n = x.shape[0]
    if n <= QUERY_BLOCK or n % QUERY_BLOCK:
      out = attend(q, segments)
    else:
      blocks = n // QUERY_BLOCK
      out = jax.lax.map(lambda a: attend(*a), (
          q.reshape(blocks, QUERY_BLOCK, *q.shape[1:]), segments.reshape(blocks, QUERY_BLOCK)))
      out = out.reshape(q.shape)
    return jnp.einsum("nhk,hkd->nd", out, self.o_proj[...])


class VisionMLP(nnx.Module):
  """SwiGLU `down(silu(gate·x) ⊙ up·x)`, no biases."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    w = lambda shape, axes, fan_in: params.weight(  # noqa: E731
        rngs, shape, axes, fan_in=fan_in, dtype=param_dtype)
    self.gate_proj = w((d, f), ("vision_embed", "vision_mlp"), d)
    self.up_proj = w((d, f), ("vision_embed", "vision_mlp"), d)
    self.down_proj = w((f, d), ("vision_mlp", "vision_embed"), f)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, D] -> [N, D]."""
    return (jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...])) @ self.down_proj[...]


class VisionLayer(nnx.Module):
  """Pre-norm block: `x += attn(norm(x)); x += mlp(norm(x))`."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
    self.attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.attention = VisionAttention(cfg, rngs=rngs, param_dtype=param_dtype)
    self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.feed_forward = VisionMLP(cfg, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x: jax.Array, angles: jax.Array, segments: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), angles, segments)
    return x + self.feed_forward(self.ffn_norm(x))


class VisionEncoder(nnx.Module):
  """Patch embedding (the stride-`patch` convolution as one matmul), ln_pre, the layers;
  the output is the last layer's, with no final norm."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
    self.cfg = cfg
    pixels = cfg.num_channels * cfg.patch_size**2
    self.patch_conv = params.weight(rngs, (pixels, cfg.hidden_size),
                                    ("vision_patch", "vision_embed"), fan_in=pixels,
                                    dtype=param_dtype)
    self.ln_pre = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.layers = nnx.List([VisionLayer(cfg, rngs=rngs, param_dtype=param_dtype)
                            for _ in range(cfg.num_layers)])

  def __call__(self, patches: jax.Array, rows: jax.Array, cols: jax.Array,
               segments: jax.Array) -> jax.Array:
    """patches: [N, C·p·p] pixels in (channel, y, x) order; rows, cols: [N] the patch's
    place in its image's grid; segments: [N] its image. Returns [N, D]."""
    w = self.patch_conv[...]
    x = self.ln_pre(patches.astype(w.dtype) @ w)
    angles = axial_angles(rows, cols, self.cfg)
    for layer in self.layers:
      x = layer(x, angles, segments)
    return x
