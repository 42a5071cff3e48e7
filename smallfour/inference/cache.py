"""The latent KV cache: a pytree passed into and returned from every step (spec §2.7).

Per layer and token it holds only the normalised KV latent `c` (kv_lora_rank values)
and the rotated shared rope key (qk_rope_head_dim values), concatenated:
(kv_lora_rank + qk_rope_head_dim) × dtype bytes per token per layer — 640 B in bf16 for
the released model, against 16 KiB for expanded keys and values.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from smallfour.config import TextConfig


# Logical axes of `LatentCache.latent`, placed by the rule table in smallfour/sharding.py.
LATENT_AXES = ("layers", "batch", "length", "kv_lora_rope")


@flax.struct.dataclass
class LatentCache:
  """The cache of `max_len` tokens per sequence, plus one position past them where decode
  sends the writes of sequences that do not advance (finished or full): it is never
  attended to, and writes to it need no bounds check (see `MLA.decode`)."""

  latent: jax.Array  # [L, B, T + 1, R + Dr]: c in [..., :R], rotated k_rope in [..., R:]
  lengths: jax.Array  # [B] int32: tokens held per sequence (= next position)

  @staticmethod
  def shape(cfg: TextConfig, batch: int, max_len: int) -> tuple[int, int, int, int]:
    """The latent's shape [L, B, T + 1, R + Dr]."""
    return (cfg.num_layers, batch, max_len + 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, max_len: int, dtype: jnp.dtype) -> "LatentCache":
    return cls(jnp.zeros(cls.shape(cfg, batch, max_len), dtype), jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    """T, the tokens a sequence can hold (the write sink excluded)."""
    return self.latent.shape[2] - 1

  @property
  def batch(self) -> int:
    return self.latent.shape[1]

  @property
  def bytes_per_token_per_layer(self) -> int:
    return self.latent.shape[3] * self.latent.dtype.itemsize


def insert(batch_cache: LatentCache, one: LatentCache, slot: jax.Array) -> LatentCache:
  """Copies a prefilled single-sequence cache (B=1, any T ≤ max_len) into batch row `slot`."""
  latent = jax.lax.dynamic_update_slice(batch_cache.latent, one.latent.astype(
      batch_cache.latent.dtype), (0, slot, 0, 0))
  lengths = jax.lax.dynamic_update_slice(batch_cache.lengths, one.lengths, (slot,))
  return LatentCache(latent, lengths)
