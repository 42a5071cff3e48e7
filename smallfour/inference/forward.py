"""Cache-aware forward passes: chunked expanded prefill and absorbed one-token decode.

Both run the model's decoder blocks through their cache-aware entry points
(`DecoderLayer.prefill` / `.decode`) and thread the `LatentCache` pytree through: prefill
writes every prompt token's latent, decode appends one token per sequence and attends
over the latent without expanding it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smallfour.inference.cache import LatentCache
from smallfour.nn.decoder import Transformer


def prefill(model: Transformer, tokens: jax.Array, lengths: jax.Array, max_len: int,
            chunk: int, image_rows: jax.Array | None = None) -> tuple[jax.Array, LatentCache]:
  """Runs right-padded prompts and returns the next-token logits and their cache.

  tokens: [B, S] (S a multiple of `chunk`, S ≤ max_len); lengths: [B] real tokens per row;
  image_rows: [M, D] the prompts' images (`model.vision`'s output), written over their
  [IMG] tokens in order. Returns (logits [B, V] at each row's last real token, LatentCache
  of T = max_len). Decode never sees images: their rows live on in the cache.
  """
  b, s = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  valid = positions < lengths[:, None]
  h = model.embed(tokens, image_rows)
  pos = model.positions(positions, h.dtype)
  latents = []
  for layer in model.layers:
    h, latent = layer.prefill(h, pos, positions, valid, chunk)
    latents.append(latent)
  latent = jnp.stack(latents)  # [L, B, S, R + Dr]
  latent = jnp.pad(latent, ((0, 0), (0, 0), (0, max_len + 1 - s), (0, 0)))  # + the sink
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  return model.logits(last)[:, 0], LatentCache(latent, lengths.astype(jnp.int32))


def decode_step(model: Transformer, tokens: jax.Array, cache: LatentCache,
                active: jax.Array, window: int | None = None) -> tuple[jax.Array, LatentCache]:
  """Feeds one token per sequence at position `cache.lengths` (absorbed MLA).

  tokens: [B]; active: [B] bool — inactive rows (finished, or with a full cache) neither
  write the cache nor advance. `window` (static, default the whole cache): attention reads
  only the first `window` cache positions; the caller guarantees every position fed is
  below it, so a short generation does not pay for a long cache.
  Returns (logits [B, V], the updated cache).
  """
  t = cache.max_len
  w = t if window is None else min(window, t)
  positions = cache.lengths[:, None]  # [B, 1]
  h = model.embed(jnp.where(active, tokens, 0)[:, None])  # finished rows feed a dummy id
  pos = model.positions(positions, h.dtype)
  write_at = jnp.where(active, cache.lengths, t)  # t: the sink, which is never read
  mask = (jnp.arange(w)[None, None, :] <= positions[:, :, None])  # [B, 1, W]
  latent = cache.latent
  for i, layer in enumerate(model.layers):
    h, latent = layer.decode(h, pos, latent, i, write_at, mask)
  lengths = cache.lengths + active.astype(jnp.int32)
  return model.logits(h)[:, 0], LatentCache(latent, lengths)
