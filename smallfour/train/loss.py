"""Next-token cross-entropy over the marked (assistant) tokens, chunked over positions.

The LM head's logits are [B, S, V] with V = 131,072: at S in the thousands they would
dwarf the rest of the step. They are formed one chunk of positions at a time, under
`jax.checkpoint` so the backward recomputes them too, in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smallfour.nn.decoder import Transformer

_F32 = jnp.float32


def token_losses(model: Transformer, h: jax.Array, targets: jax.Array, chunk: int
                 ) -> jax.Array:
  """h: [B, S, D] last hidden states; targets: [B, S] next-token ids -> [B, S] float32
  negative log-likelihoods. S must be a multiple of `chunk`."""
  b, s, d = h.shape

  @jax.checkpoint
  def one(args):
    hc, tc = args  # [B, C, D], [B, C]
    logits = model.logits(hc).astype(_F32)
    target = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target

  split = lambda x: jnp.moveaxis(x.reshape(b, s // chunk, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
  out = jax.lax.map(one, (split(h), split(targets)))  # [S / C, B, C]
  return jnp.moveaxis(out, 0, 1).reshape(b, s)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of `values` where `mask`; 0 when nothing is marked (a caller's error:
  the data pipeline never builds a batch without marked tokens)."""
  mask = mask.astype(_F32)
  return jnp.sum(values * mask) / jnp.maximum(mask.sum(), 1.0)
