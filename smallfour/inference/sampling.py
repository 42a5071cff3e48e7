"""Token sampling: greedy, temperature, top-k and top-p, in float32 with explicit keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """logits: [B, V] -> token ids [B] int32. Deterministic for a given key.

  Filters compare logits, so ties survive together: top-k keeps every token equal to the
  k-th largest logit, and top-p every token equal to the last one its mass needs
  (tests/test_sampling.py checks this against a numpy reference).
  """
  logits = logits.astype(jnp.float32)
  if s.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
