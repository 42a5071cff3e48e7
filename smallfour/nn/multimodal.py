"""Images into the text stream: packing, the vision path, and the scatter (spec §5.2, §5.5).

`pack` (host side, numpy) cuts preprocessed images into one padded sequence of patches
with the indices the encoder and projector need; `VisionPath` turns it into one
text-width row per image token; `merge` writes those rows, in order, over the
embeddings of the `[IMG]` positions, scanning the batch in (row, position) order as
transformers' masked scatter does. `[IMG_BREAK]` and `[IMG_END]` keep their embeddings.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour.config import VisionConfig
from smallfour.nn.projector import Projector
from smallfour.nn.vision import VisionEncoder


class ImageBatch(NamedTuple):
  """Images packed into one sequence of N patches (a pytree of arrays).

  patches: [N, C·p·p] (channel, y, x) pixels; rows, cols: [N] each patch's place in its
  image's grid; segments: [N] its image (padding patches form one more segment);
  merge_index: [M, merge²] each image token's patches, images in order, tokens
  row-major within an image. N and M may be padded (see `pack`).
  """

  patches: jax.Array | np.ndarray
  rows: jax.Array | np.ndarray
  cols: jax.Array | np.ndarray
  segments: jax.Array | np.ndarray
  merge_index: jax.Array | np.ndarray


def grid(pixels: np.ndarray, cfg: VisionConfig) -> tuple[int, int]:
  """The (rows, cols) of image tokens of a preprocessed image [C, H, W]; raises
  ValueError unless H and W are positive multiples of patch × merge."""
  shape = np.shape(pixels)
  c, h, w = shape if len(shape) == 3 else (0, 0, 0)
  step = cfg.merged_patch
  if c != cfg.num_channels or h <= 0 or w <= 0 or h % step or w % step:
    raise ValueError(f"a preprocessed image is [{cfg.num_channels}, H, W] with H and W "
                     f"positive multiples of {step}; got {list(shape)}")
  return h // step, w // step


def image_tokens(rows: int, cols: int, cfg: VisionConfig) -> list[int]:
  """The prompt ids of one image: `rows` lines of `cols` [IMG] and an [IMG_BREAK], the
  last break an [IMG_END]."""
  ids = ([cfg.image_token_id] * cols + [cfg.image_break_token_id]) * rows
  ids[-1] = cfg.image_end_token_id
  return ids


def pack(images: Sequence[np.ndarray], cfg: VisionConfig, pad_to: int | None = None
         ) -> ImageBatch:
  """Preprocessed images [C, H, W] (float32) -> one ImageBatch of N = `pad_to` patches
  (default: exactly the images' patches) and M = N / merge² image tokens."""
  p, m = cfg.patch_size, cfg.spatial_merge_size
  patches, rows, cols, segments, merge_index = [], [], [], [], []
  start = 0
  for i, pixels in enumerate(images):
    gr, gc = grid(pixels, cfg)
    h, w = gr * m, gc * m  # patches per side
    x = np.asarray(pixels, np.float32).reshape(cfg.num_channels, h, p, w, p)
    patches.append(x.transpose(1, 3, 0, 2, 4).reshape(h * w, -1))
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows.append(r.ravel())
    cols.append(c.ravel())
    segments.append(np.full(h * w, i))
    # Block (bi, bj) holds patches (m·bi + di, m·bj + dj), di, dj row-major.
    bi, bj, di, dj = np.meshgrid(np.arange(gr), np.arange(gc), np.arange(m), np.arange(m),
                                 indexing="ij")
    merge_index.append(start + ((m * bi + di) * w + m * bj + dj).reshape(gr * gc, m * m))
    start += h * w
  n = start if pad_to is None else pad_to
  if n < start or n % (m * m):
    raise ValueError(f"pad_to={pad_to} must be a multiple of {m * m} holding {start} patches")
  extra = n - start
  patches.append(np.zeros((extra, cfg.num_channels * p * p), np.float32))
  rows.append(np.zeros(extra, np.int64))
  cols.append(np.zeros(extra, np.int64))
  segments.append(np.full(extra, len(images)))
  merge_index.append(np.zeros((extra // (m * m), m * m), np.int64))
  cat = lambda parts, dtype: np.concatenate(parts).astype(dtype)  # noqa: E731
  return ImageBatch(cat(patches, np.float32), cat(rows, np.int32), cat(cols, np.int32),
                    cat(segments, np.int32), cat(merge_index, np.int32))


class VisionPath(nnx.Module):
  """The Pixtral encoder and the projector: an ImageBatch -> rows for the [IMG] tokens."""

  def __init__(self, cfg: VisionConfig, text_hidden: int, *, rngs: nnx.Rngs,
               param_dtype: jnp.dtype):
    self.encoder = VisionEncoder(cfg, rngs=rngs, param_dtype=param_dtype)
    self.projector = Projector(cfg, text_hidden, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, images: ImageBatch) -> jax.Array:
    """-> [M, D] image rows, images in order, each image's tokens row-major."""
    x = self.encoder(images.patches, images.rows, images.cols, images.segments)
    return self.projector(x, images.merge_index)


def merge(h: jax.Array, tokens: jax.Array, image_rows: jax.Array,
          image_token_id: int) -> jax.Array:
  """h: [B, S, D] token embeddings; tokens: [B, S]; image_rows: [M, D] (M at least the
  number of [IMG] tokens; the rest is padding) -> h with the k-th [IMG] of the flattened
  batch replaced by image_rows[k], cast to h's dtype."""
  is_image = tokens == image_token_id
  index = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
  rows = jnp.take(image_rows.astype(h.dtype), jnp.clip(index, 0, image_rows.shape[0] - 1),
                  axis=0)
  return jnp.where(is_image[..., None], rows, h)
