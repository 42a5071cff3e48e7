"""The inference engine: validated requests, bucketed prefill, insert, jitted generation.

The jit boundary is functional: the model is split once into (graphdef, state) and
every compiled function takes the state as an argument and merges inside, so weights
are never baked into executables. The cache is donated to every step. Prompt lengths
are padded to power-of-two buckets, so a handful of prefill shapes compile.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour.inference import cache as cache_lib
from smallfour.inference import forward
from smallfour.inference.cache import LatentCache
from smallfour.inference.sampling import Sampling, sample
from smallfour.nn.decoder import Transformer

MIN_BUCKET = 16
PAD = -1  # marks "no token" in generated outputs


class RequestError(ValueError):
  """A request the engine cannot serve; the engine stays usable."""


class Engine:
  """Generates from one model with a latent cache of `max_len` tokens per sequence."""

  def __init__(self, model: Transformer, *, max_len: int, prefill_chunk: int = 256):
    self.cfg = model.cfg
    self.max_len = max_len
    self.prefill_chunk = prefill_chunk
    self.graphdef, self.state = nnx.split(model)
    self.dtype = model.embedder[...].dtype
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("chunk",))
    self._insert = jax.jit(cache_lib.insert, donate_argnums=0)
    self._first = jax.jit(self._first_impl, static_argnames=("sampling", "max_new_tokens"))
    self._step = jax.jit(self._step_impl, static_argnames=("sampling",),
                         donate_argnames=("cache",))
    self._loop = jax.jit(self._loop_impl, static_argnames=("sampling", "max_new_tokens"),
                         donate_argnames=("cache",))

  # ------------------------------------------------------------------ public API

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raises RequestError naming the offending prompt; nothing is computed."""
    if not prompts:
      raise RequestError("no prompts given")
    if max_new_tokens < 1:
      raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise RequestError(f"prompt {i} is empty")
      if len(p) > self.max_len:
        raise RequestError(f"prompt {i} has {len(p)} tokens; the cache holds {self.max_len}")
      bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
      if bad:
        raise RequestError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size}): "
                           f"{bad[:5]}")

  def prefill(self, prompt: Sequence[int]) -> tuple[jax.Array, LatentCache]:
    """One prompt -> (next-token logits [1, V], its cache [B=1, T=max_len])."""
    s = self.bucket(len(prompt))
    tokens = np.zeros((1, s), np.int32)
    tokens[0, :len(prompt)] = prompt
    chunk = self.prefill_chunk if s % self.prefill_chunk == 0 else s
    return self._prefill(self.state, jnp.asarray(tokens),
                         jnp.asarray([len(prompt)], jnp.int32), chunk=chunk)

  def start(self, prompts: Sequence[Sequence[int]]) -> tuple[jax.Array, LatentCache]:
    """Prefills every prompt and inserts it into its batch slot -> (logits [B, V], cache)."""
    cache = LatentCache.zeros(self.cfg, len(prompts), self.max_len, self.dtype)
    logits = []
    for slot, prompt in enumerate(prompts):
      row_logits, one = self.prefill(prompt)
      cache = self._insert(cache, one, slot)
      logits.append(row_logits)
    return jnp.concatenate(logits), cache

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0) -> list[list[int]]:
    """Generates up to `max_new_tokens` per prompt, under one `jax.lax.while_loop`.

    A sequence stops at EOS (kept in its output), at `max_new_tokens`, or when its cache
    is full. Returns the generated ids per prompt (prompt excluded).
    """
    self.validate(prompts, max_new_tokens)
    logits, cache = self.start(prompts)
    state = self._first(logits, cache.lengths, jax.random.key(seed), sampling=sampling,
                        max_new_tokens=max_new_tokens)
    out, _ = self._loop(self.state, cache, *state, sampling=sampling,
                        max_new_tokens=max_new_tokens)
    return _trim(np.asarray(out))

  def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0) -> Iterator[list[int | None]]:
    """The same generation one step at a time: yields each step's token per prompt
    (None once a prompt has stopped). Equal, token for token, to `generate`."""
    self.validate(prompts, max_new_tokens)
    logits, cache = self.start(prompts)
    tokens, out, done, key = self._first(logits, cache.lengths, jax.random.key(seed),
                                         sampling=sampling, max_new_tokens=max_new_tokens)
    yield [int(t) for t in np.asarray(out[:, 0])]
    for i in range(1, max_new_tokens):
      if bool(jnp.all(done)):
        return
      was_done = np.asarray(done)
      tokens, cache, done, key = self._step(self.state, cache, tokens, done, key,
                                            sampling=sampling)
      yield [None if d else int(t) for t, d in zip(np.asarray(tokens), was_done)]

  def bucket(self, length: int) -> int:
    """The padded prefill length: the next power of two ≥ 16, capped at max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), self.max_len)

  # ------------------------------------------------------------- compiled parts

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _prefill_impl(self, state, tokens, lengths, *, chunk):
    return forward.prefill(self._model(state), tokens, lengths, self.max_len, chunk)

  def _first_impl(self, logits, lengths, key, *, sampling, max_new_tokens):
    """Samples the first token from the prefill logits; sets up the loop state."""
    key, sub = jax.random.split(key)
    tokens = sample(logits, sub, sampling)
    out = jnp.full((logits.shape[0], max_new_tokens), PAD, jnp.int32).at[:, 0].set(tokens)
    done = self._stops(tokens, lengths)
    return tokens, out, done, key

  def _stops(self, tokens, lengths):
    """EOS was produced, or the cache has no room to feed the token back."""
    full = lengths >= self.max_len
    return full if self.cfg.eos_token_id is None else full | (tokens == self.cfg.eos_token_id)

  def _step_impl(self, state, cache, tokens, done, key, *, sampling):
    """Feeds `tokens` for rows not done and samples the next ones."""
    logits, cache = forward.decode_step(self._model(state), tokens, cache, ~done)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, PAD, sample(logits, sub, sampling))
    return nxt, cache, done | self._stops(nxt, cache.lengths), key

  def _loop_impl(self, state, cache, tokens, out, done, key, *, sampling, max_new_tokens):
    def cond(carry):
      i, _, _, _, done, _ = carry
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      i, cache, tokens, out, done, key = carry
      tokens, cache, new_done, key = self._step_impl(state, cache, tokens, done, key,
                                                     sampling=sampling)
      return i + 1, cache, tokens, out.at[:, i].set(tokens), new_done, key

    carry = (jnp.int32(1), cache, tokens, out, done, key)
    _, cache, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, cache  # returning the cache lets XLA reuse the donated buffer


def _trim(out: np.ndarray) -> list[list[int]]:
  return [[int(t) for t in row if t != PAD] for row in out]
