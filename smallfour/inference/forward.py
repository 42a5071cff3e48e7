"""Cache-aware forward passes: chunked expanded prefill and absorbed one-token decode.

Both run the model's decoder blocks through their cache-aware entry points
(`DecoderLayer.prefill` / `.decode`) and thread the `LatentCache` pytree through: prefill
writes every prompt token's latent, decode appends one token per sequence and attends
over the latent without expanding it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from smallfour.inference.cache import LatentCache
from smallfour.nn.decoder import Transformer

# The LM head's vocab axis is split over `tensor` first (as the rule table holds it), then
# over the replica axes, so each device's slice lies inside the part of the head it holds.
_HEAD_AXES = ("tensor", "data", "expert")


def next_logits(model: Transformer, h: jax.Array) -> jax.Array:
  """h: [B, 1, D] last hidden states -> next-token logits [B, V].

  Under a mesh the logits come out split over vocab on every mesh axis that divides it.
  The rule table splits the head's vocab over `tensor` only, so every `data` / `expert`
  replica holds all of its columns, and an unconstrained product reads them all on every
  device each step: 1.07 GB of the 119B's bf16 head, ~5% of a v5p-16 decode step. Split
  this way each device reads 1/devices of the head (a slice of what it holds) from B
  gathered rows; the sampler's reductions over V then combine the slices.
  """
  logits = model.logits(h)[:, 0]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return logits
  axes, size = [], logits.shape[1]
  for axis in _HEAD_AXES:
    if mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0:
      axes.append(axis)
      size //= mesh.shape[axis]
  return jax.lax.with_sharding_constraint(logits, P(None, tuple(axes) or None))


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
  return next_logits(model, last), LatentCache(latent, lengths.astype(jnp.int32))


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
  return next_logits(model, h), LatentCache(latent, lengths)
