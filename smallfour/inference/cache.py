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
  latent: jax.Array  # [L, B, T, R + Dr]: c in [..., :R], rotated k_rope in [..., R:]
  lengths: jax.Array  # [B] int32: tokens held per sequence (= next position)

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, max_len: int, dtype: jnp.dtype) -> "LatentCache":
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return cls(jnp.zeros((cfg.num_layers, batch, max_len, width), dtype),
               jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.latent.shape[2]

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
