"""Token sampling: greedy, temperature, top-k and top-p, in float32 with explicit keys.

`sample` takes one static `Sampling` for the whole batch; `sample_rows` takes them per row,
as arrays (`SamplingRows`), with one key per row.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


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


# The model card's sampling per reasoning_effort (shared/spec/CHAT_FORMAT.md §5): greedy
# without reasoning, temperature 0.7 with it; top_p 1 and no top_k either way. The CLI,
# the server and the notebooks start from these.
BY_REASONING_EFFORT = {"none": Sampling(temperature=0.0), "high": Sampling(temperature=0.7)}


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """logits: [B, V] -> token ids [B] int32. Deterministic for a given key.

  Filters compare logits, so ties survive together: top-k keeps every token equal to the
  k-th largest logit, and top-p every token equal to the last one its mass needs
  (tests/test_sampling.py checks this against a numpy reference).
  """
  logits = logits.astype(jnp.float32)
  if s.greedy:
    return _argmax(logits)
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


@flax.struct.dataclass
class SamplingRows:
  """Per-row `Sampling` parameters as arrays, so that one compiled step serves any mix of
  them (a continuous batch whose slots each carry their own request's)."""

  temperature: jax.Array  # [B] float32; 0 means greedy
  top_k: jax.Array  # [B] int32; 0 disables
  top_p: jax.Array  # [B] float32; 1 disables

  @classmethod
  def of(cls, rows: Sequence[Sampling]) -> SamplingRows:
    """Host arrays of `rows`' parameters, one row each."""
    return cls(np.asarray([s.temperature for s in rows], np.float32),
               np.asarray([s.top_k for s in rows], np.int32),
               np.asarray([s.top_p for s in rows], np.float32))


def sample_rows(logits: jax.Array, keys: jax.Array, s: SamplingRows) -> jax.Array:
  """`sample` with each row's own key and parameters. logits: [B, V]; keys: [B] typed
  PRNG keys -> token ids [B] int32.

  Row b draws what `sample(logits[b:b+1], keys[b], Sampling(...row b...))` draws from, with
  the same tie rules. The filters need one sort of the vocabulary per row, which is paid only
  when some row filters, and a batch of greedy rows pays for no sampling at all.
  """
  logits = logits.astype(jnp.float32)
  greedy = _argmax(logits)

  def drawn(logits):
    z = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    filters = jnp.any((s.top_k > 0) | (s.top_p < 1))
    z = jax.lax.cond(filters, _filtered_rows, lambda z, s: z, z, s)
    return jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)

  sampled = jax.lax.cond(jnp.all(s.temperature == 0), lambda _: greedy, drawn, logits)
  return jnp.where(s.temperature == 0, greedy, sampled)


def _filtered_rows(z: jax.Array, s: SamplingRows) -> jax.Array:
  """z: [B, V] tempered logits -> the same with each row's top-k / top-p rejects at -inf."""
  v = z.shape[-1]
  desc = jnp.sort(z, axis=-1)[..., ::-1]
  k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, v), v)
  kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
  desc = jnp.where(desc < kth, -jnp.inf, desc)  # = the sorted top-k survivors
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  cutoff = jnp.min(jnp.where(before < s.top_p[:, None], desc, jnp.inf), axis=-1,
                   keepdims=True)
  cutoff = jnp.where(s.top_p[:, None] < 1, jnp.maximum(cutoff, kth), kth)
  return jnp.where(z < cutoff, -jnp.inf, z)


def _argmax(logits: jax.Array, block: int = 512) -> jax.Array:
  """`jnp.argmax` over [B, V] -> [B] int32 (the first maximum), in two levels: the first
  block holding the row's maximum, then the first maximum in it. On XLA:CPU an
  index-carrying reduction over a 131,072-wide row takes ~16 ms for 16 rows; plain block
  maxima and two short argmaxes take ~1 ms."""
  b, v = logits.shape
  block = min(block, v)
  x = jnp.pad(logits, ((0, 0), (0, -v % block)), constant_values=-jnp.inf)
  x = x.reshape(b, -1, block)
  first = jnp.argmax(jnp.max(x, axis=-1), axis=-1)
  inner = jnp.take_along_axis(x, first[:, None, None], axis=1)[:, 0]
  return (first * block + jnp.argmax(inner, axis=-1)).astype(jnp.int32)
