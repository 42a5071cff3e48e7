"""The sides `decode.py` times besides transformers: the contiguous latent cache as the
engine ran it before paging (the baseline), and the paged Engine driven step by step."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour.inference import cache as cache_lib
from smallfour.inference import forward
from smallfour.inference.cache import LatentCache
from smallfour.inference.engine import Engine
from smallfour.inference.paged import bucket
from smallfour.inference.requests import GREEDY, Request
from smallfour.inference.sampling import SamplingRows, sample
from smallfour.nn.decoder import Transformer


class Contiguous:
  """The contiguous latent cache as the old `Engine` ran it (`git show 3163c9b~1:smallfour/
  inference/engine.py`): a [L, B, max_len + 1, R + Dr] cache, prompts prefilled one by one
  (padded to a power-of-two bucket, attention chunk 256) and inserted into their rows, then
  one compiled decode step per token, greedy, the cache donated, attending over a window of
  the bucketed longest prompt + new tokens; or those steps under one `while_loop`."""

  def __init__(self, model: Transformer, *, max_len: int, chunk: int = 256):
    self.cfg, self.max_len, self.chunk = model.cfg, max_len, chunk
    self.graphdef, self.state = nnx.split(model)
    self.dtype = model.embedder.get_value().dtype
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("chunk",))
    self._zeros = jax.jit(lambda batch: LatentCache.zeros(self.cfg, batch, max_len, self.dtype),
                          static_argnums=0)
    self._insert = jax.jit(cache_lib.insert, donate_argnums=0)
    self._first = jax.jit(lambda logits: sample(logits, None, GREEDY))
    self._step = jax.jit(self._step_impl, static_argnames=("window",), donate_argnums=1)
    self._loop = jax.jit(self._loop_impl, static_argnames=("steps", "window"),
                         donate_argnums=1)

  def bucket(self, n: int) -> int:
    return min(max(16, 1 << (n - 1).bit_length()), self.max_len)

  def prefill(self, prompt) -> tuple[jax.Array, LatentCache]:
    s = self.bucket(len(prompt))
    tokens = np.zeros((1, s), np.int32)
    tokens[0, :len(prompt)] = prompt
    chunk = self.chunk if s % self.chunk == 0 else s
    return self._prefill(self.state, jnp.asarray(tokens),
                         jnp.asarray([len(prompt)], np.int32), chunk=chunk)

  def generate(self, prompts: np.ndarray, new: int, loop: bool = False,
               steps: list[float] | None = None) -> np.ndarray:
    """`new` greedy tokens per prompt -> [B, new]; `steps` gets each decode step's seconds
    (not under the loop)."""
    cache, logits = self._zeros(len(prompts)), []
    for slot, prompt in enumerate(prompts):
      row_logits, one = self.prefill(prompt)
      cache = self._insert(cache, one, slot)
      logits.append(row_logits)
    tokens = self._first(jnp.concatenate(logits))
    out = [np.asarray(tokens)]
    window = self.bucket(max(map(len, prompts)) + new)
    if loop and new > 1:
      rest, cache = self._loop(self.state, cache, tokens, steps=new - 1, window=window)
      out.extend(np.asarray(rest))
    elif not loop:
      for _ in range(new - 1):
        start = time.perf_counter()
        tokens, cache = self._step(self.state, cache, tokens, window=window)
        out.append(np.asarray(tokens))
        if steps is not None:
          steps.append(time.perf_counter() - start)
    return np.stack(out, axis=1)

  def _prefill_impl(self, state, tokens, lengths, *, chunk):
    return forward.prefill(nnx.merge(self.graphdef, state), tokens, lengths, self.max_len,
                           chunk)

  def _step_impl(self, state, cache, tokens, *, window):
    active = jnp.ones(tokens.shape, bool)
    logits, cache = forward.decode_step(nnx.merge(self.graphdef, state), tokens, cache,
                                        active, window)
    return sample(logits, None, GREEDY), cache

  def _loop_impl(self, state, cache, tokens, *, steps, window):
    def body(i, carry):
      cache, tokens, out = carry
      tokens, cache = self._step_impl(state, cache, tokens, window=window)
      return cache, tokens, out.at[i].set(tokens)

    out = jnp.zeros((steps, tokens.shape[0]), jnp.int32)
    cache, _, out = jax.lax.fori_loop(0, steps, body, (cache, tokens, out))
    return out, cache


def paged_generate(engine: Engine, prompts: np.ndarray, new: int,
                   steps: list[float] | None = None) -> list[list[int]]:
  """`Engine.run` of greedy requests, written out (submit each, then `step()` until none
  is left) so that `steps` gets the seconds of each step after every prompt has its first
  token: the steps that only decode."""
  got = [[] for _ in prompts]
  for i, prompt in enumerate(prompts):
    engine.submit(Request(tuple(int(t) for t in prompt), new),
                  lambda event, i=i: event.token is not None and got[i].append(event.token))
  while True:
    decoding = all(got)
    start = time.perf_counter()
    if not engine.step():
      return got
    if steps is not None and decoding:
      steps.append(time.perf_counter() - start)


def paged_steps(engine: Engine, prompts: np.ndarray, steps: int
                ) -> Callable[[list[float] | None], None]:
  """The bare decode step of `engine`'s PagedModel: the prompts prefilled into pages of a
  pool of its own, then a function running `steps` decode steps from there (each step's
  tokens read back and fed in, positions advanced on the host; the page table built once,
  as wide as the Engine's for these lengths)."""
  pm, p, b = engine.paged, engine.page_size, engine.max_batch
  length = prompts.shape[1]
  width = bucket(-(-(length + steps + 1) // p))
  table = np.full((b, width), pm.sink, np.int32)
  table[:len(prompts)] = np.arange(len(prompts) * width, dtype=np.int32).reshape(-1, width)
  keys = np.zeros((b, 2), np.uint32)
  pool, first = pm.zeros(), np.zeros(b, np.int32)
  for i, prompt in enumerate(prompts):
    pool, drawn, _ = pm.extend(pool, np.asarray(prompt, np.int32), 0,
                               table[i, :-(-len(prompt) // p)], keys[i],
                               SamplingRows.of([GREEDY]))
    first[i] = int(np.asarray(drawn)[0])
  rows = SamplingRows.of([GREEDY] * b)
  held = [pool]

  def run(times: list[float] | None = None):
    tokens, positions = first.copy(), np.zeros(b, np.int32)
    positions[:len(prompts)] = length
    for _ in range(steps):
      start = time.perf_counter()
      held[0], drawn, _ = pm.decode(held[0], tokens, positions, table, keys, rows)
      tokens = np.asarray(drawn)
      positions[:len(prompts)] += 1
      if times is not None:
        times.append(time.perf_counter() - start)
  run()  # compiled (the Engine's step, already) and warm
  return run
