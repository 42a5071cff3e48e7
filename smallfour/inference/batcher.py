"""Continuous batching: a fixed set of slots decoded together, requests joining and leaving
between steps.

    batcher = Batcher(model, max_batch=8, max_len=4096)
    ticket = batcher.submit(Request(prompt, max_new_tokens=64), sink)  # sink(Event)
    batcher.start()  # the engine thread (or call `step()` / `generate()` yourself)
    ticket.cancel()  # frees its slot before the next step

Every step decodes all active slots in one compiled call of `max_batch` rows. Between steps,
finished and cancelled slots are freed and waiting requests are prefilled (one prompt per
call, bucketed and attention-chunked as in `Engine`) and inserted into free slots, so no
request waits for another to finish. Each slot carries its request's sampling parameters
as arrays (`SamplingRows`) and its own PRNG key, drawn from the request's seed and advanced
only by its own draws: neither a request's tokens nor the compiled step depend on what else
is in the batch. The attention window of a step is the longest active sequence, bucketed to
a power of two, so few windows compile.

The jit boundary is functional, as in `Engine`: the state is an argument, and the cache,
the slots' tokens and keys are donated to every call. Single process only (a mesh over this
process's devices): the engine decides on the host what each step does.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour import sharding
from smallfour.inference import cache as cache_lib
from smallfour.inference import forward
from smallfour.inference.cache import LATENT_AXES, LatentCache
from smallfour.inference.engine import MIN_BUCKET, RequestError
from smallfour.inference.sampling import Sampling, SamplingRows, sample_rows
from smallfour.nn.decoder import Transformer

GREEDY = Sampling()


class QueueFull(RuntimeError):
  """Every slot is busy, or about to be, and `max_queue` requests already wait."""


class EngineFailed(RuntimeError):
  """The engine thread died; no request can be served any more."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation: up to `max_new_tokens` after `prompt`, stopping at EOS."""

  prompt: tuple[int, ...]
  max_new_tokens: int
  sampling: Sampling = GREEDY
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Event:
  """What a request's sink receives, once per token: `token`, and with the last one (or
  alone) `finish_reason`: "stop" (EOS, kept as the token), "length" (max_new_tokens or a
  full cache), "cancelled" or "error" (then `error` says why)."""

  token: int | None = None
  finish_reason: str | None = None
  error: str | None = None


Sink = Callable[[Event], None]


class Ticket:
  """A submitted request: `cancel()` it from any thread."""

  def __init__(self, request: Request, sink: Sink, wake: Callable[[], None]):
    self.request, self.sink = request, sink
    self.cancelled = False
    self._wake = wake

  def cancel(self) -> None:
    self.cancelled = True
    self._wake()


@dataclasses.dataclass
class _Slot:
  ticket: Ticket
  length: int  # tokens in the cache (= the position the next step feeds)
  generated: int  # tokens delivered


class Batcher:
  """Serves `Request`s from `max_batch` slots of `max_len` cached tokens each."""

  def __init__(self, model: Transformer, *, max_batch: int, max_len: int,
               max_queue: int | None = None, prefill_chunk: int = 256,
               prefill_budget: int = 1024, eos_id: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
    """`max_queue`: requests that may wait while every slot is busy (None: no limit);
    `prefill_budget`: prompt tokens prefilled between two steps (at least one prompt), which
    bounds how long running streams pause for newcomers; `eos_id`: the stop token (default
    the config's; None there: none); `mesh`: where the model's parameters live."""
    self.cfg = model.cfg
    self.eos_id = model.cfg.eos_token_id if eos_id is None else eos_id
    self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
    self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(model)
    if mesh is not None:
      self.state = jax.device_put(self.state, sharding.named_shardings(self.state, mesh))
    dtype = model.embedder.get_value().dtype
    self._prefill = self._jit(self._prefill_impl, static_argnames=("chunk",))
    self._admit = self._jit(self._admit_impl, donate_argnums=(0, 1, 2))
    self._step = self._jit(self._step_impl, static_argnames=("window",),
                           donate_argnums=(1, 2, 3))
    zeros = self._jit(lambda: (self._placed(LatentCache.zeros(self.cfg, max_batch, max_len,
                                                              dtype)),
                               *self._whole(jnp.zeros((max_batch,), jnp.int32),
                                            jnp.zeros((max_batch, 2), jnp.uint32))))
    self._cache, self._tokens, self._keys = zeros()
    self._slots: list[_Slot | None] = [None] * max_batch
    self._rows = SamplingRows.of([GREEDY] * max_batch)  # host copies of the slots' parameters
    self._placed_rows = None  # (active mask, rows) on the device, until the slots change
    self._waiting: collections.deque[Ticket] = collections.deque()
    self._lock = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.failure: BaseException | None = None

  # ------------------------------------------------------------------ requests

  def validate(self, request: Request) -> None:
    """Raises RequestError naming what is wrong; nothing is computed."""
    n = len(request.prompt)
    if n == 0:
      raise RequestError("the prompt is empty")
    if n > self.max_len:
      raise RequestError(f"the prompt has {n} tokens; the cache holds {self.max_len}")
    if request.max_new_tokens < 1:
      raise RequestError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if not 0 <= request.seed < 2**32:
      raise RequestError(f"seed must be in [0, 2**32), got {request.seed}")
    bad = [t for t in request.prompt if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise RequestError(f"the prompt has token ids outside [0, {self.cfg.vocab_size}): "
                         f"{bad[:5]}")

  def submit(self, request: Request, sink: Sink) -> Ticket:
    """Queues `request`; `sink` is called from the engine thread with each `Event`.
    Raises RequestError, QueueFull or EngineFailed, and then queues nothing."""
    self.validate(request)
    ticket = Ticket(request, sink, self._wake)
    with self._lock:
      if self.failure is not None:
        raise EngineFailed(f"the engine failed: {self.failure!r}")
      free = self.max_batch - self.active
      if self.max_queue is not None and len(self._waiting) >= free + self.max_queue:
        raise QueueFull(f"all {self.max_batch} slots are busy and {self.max_queue} requests "
                        "already wait")
      self._waiting.append(ticket)
      self._lock.notify()
    return ticket

  @property
  def active(self) -> int:
    """Slots holding a request."""
    return sum(s is not None for s in self._slots)

  @property
  def waiting(self) -> int:
    return len(self._waiting)

  def generate(self, requests: Sequence[Request]) -> list[tuple[list[int], str]]:
    """Runs `requests` together in this thread -> (tokens, finish_reason) per request.
    Not while the engine thread runs."""
    results = [([], None) for _ in requests]

    def sink(i):
      def on(event: Event):
        if event.token is not None:
          results[i][0].append(event.token)
        if event.finish_reason is not None:
          results[i] = (results[i][0], event.finish_reason)
      return on

    for i, r in enumerate(requests):
      self.submit(r, sink(i))
    while self.step():
      pass
    return results

  def warmup(self) -> list[int]:
    """Compiles every prompt bucket's prefill and every window's step (a request of each
    bucket's length less one), so that no client waits for a compilation. Returns the
    buckets. Not while the engine thread runs."""
    buckets = sorted({self.bucket(n) for n in range(1, self.max_len + 1)})
    for b in buckets:  # one at a time: a step's window is its longest sequence's
      self.generate([Request((0,) * max(b - 1, 1), 2)])
    return buckets

  # -------------------------------------------------------------- the engine loop

  def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
    """Runs the engine in a daemon thread until `stop()`. If a step raises, every request
    gets an "error" event, later submits raise EngineFailed and `on_failure` is called."""
    self._stopping = False
    self._thread = threading.Thread(target=self._run, args=(on_failure,),
                                    name="smallfour-batcher", daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = None) -> None:
    with self._lock:
      self._stopping = True
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  def _run(self, on_failure) -> None:
    try:
      while True:
        with self._lock:
          while not self._stopping and not self._waiting and not self.active:
            self._lock.wait()
          if self._stopping:
            return
        self.step()
    except BaseException as e:  # noqa: BLE001 - every client must hear of it
      with self._lock:
        self.failure = e
        tickets = [s.ticket for s in self._slots if s is not None] + list(self._waiting)
        self._slots = [None] * self.max_batch
        self._waiting.clear()
      for t in tickets:
        t.sink(Event(finish_reason="error", error=f"the engine failed: {e!r}"))
      if on_failure is not None:
        on_failure(e)

  def _wake(self) -> None:
    with self._lock:
      self._lock.notify()

  def step(self) -> bool:
    """Frees cancelled slots, admits waiting requests, decodes one token for every active
    slot and hands each its event. False when there was nothing to do."""
    self._free_cancelled()
    budget = self.prefill_budget
    while budget > 0 and None in self._slots:
      with self._lock:
        ticket = self._waiting.popleft() if self._waiting else None
      if ticket is None:
        break
      if ticket.cancelled:
        ticket.sink(Event(finish_reason="cancelled"))
        continue
      budget -= len(ticket.request.prompt)
      self._start(ticket, self._slots.index(None))
    live = [i for i, s in enumerate(self._slots) if s is not None]
    if not live:
      return bool(self._waiting)
    if self._placed_rows is None:  # the slots changed: send their mask and parameters anew
      active = np.zeros(self.max_batch, bool)
      active[live] = True
      self._placed_rows = self._put(active), jax.tree.map(self._put, self._rows)
    window = self.bucket(max(self._slots[i].length for i in live) + 1)
    self._cache, self._tokens, self._keys = self._step(
        self.state, self._cache, self._tokens, self._keys, *self._placed_rows, window=window)
    tokens = np.asarray(self._tokens)
    for i in live:
      slot = self._slots[i]
      slot.length += 1
      self._deliver(i, int(tokens[i]))
    return True

  def _free_cancelled(self) -> None:
    for i, slot in enumerate(self._slots):
      if slot is not None and slot.ticket.cancelled:
        self._free(i)
        slot.ticket.sink(Event(finish_reason="cancelled"))

  def _start(self, ticket: Ticket, i: int) -> None:
    """Prefills the request, inserts it into slot `i` and delivers its first token."""
    r = ticket.request
    s = self.bucket(len(r.prompt))
    tokens = np.zeros((1, s), np.int32)
    tokens[0, :len(r.prompt)] = r.prompt
    chunk = self.prefill_chunk if s % self.prefill_chunk == 0 else s
    logits, one = self._prefill(self.state, self._put(tokens),
                                self._put(np.asarray([len(r.prompt)], np.int32)), chunk=chunk)
    row = SamplingRows.of([r.sampling])
    self._cache, self._tokens, self._keys, first = self._admit(
        self._cache, self._tokens, self._keys, one, logits, self._put(np.int32(i)),
        self._put(np.uint32(r.seed)), jax.tree.map(self._put, row))
    self._slots[i] = _Slot(ticket, length=len(r.prompt), generated=0)
    self._placed_rows = None
    for name in ("temperature", "top_k", "top_p"):
      getattr(self._rows, name)[i] = getattr(row, name)[0]
    self._deliver(i, int(first))

  def _deliver(self, i: int, token: int) -> None:
    """Hands slot `i` its new token, and frees the slot when that was its last."""
    slot = self._slots[i]
    slot.generated += 1
    finish = None
    if token == self.eos_id:
      finish = "stop"
    elif slot.generated >= slot.ticket.request.max_new_tokens or slot.length >= self.max_len:
      finish = "length"  # the cache has no room to feed the token back
    if finish is not None:
      self._free(i)
    slot.ticket.sink(Event(token, finish))

  def _free(self, i: int) -> None:
    self._slots[i] = None
    self._placed_rows = None
    for name in ("temperature", "top_k", "top_p"):
      getattr(self._rows, name)[i] = getattr(GREEDY, name)  # idle rows cost no sampling

  def bucket(self, length: int) -> int:
    """The next power of two ≥ MIN_BUCKET, capped at max_len: prompt and window sizes."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), self.max_len)

  # -------------------------------------------------------------- compiled parts

  def _prefill_impl(self, state, tokens, lengths, *, chunk):
    model = nnx.merge(self.graphdef, state)
    logits, one = forward.prefill(model, tokens, lengths, self.max_len, chunk)
    return self._whole(logits)[0], self._placed(one)

  def _admit_impl(self, cache, tokens, keys, one, logits, slot, seed, row):
    """Inserts a prefilled sequence into `slot` and samples its first token."""
    key, sub = jax.random.split(jax.random.key(seed))
    first = sample_rows(logits, sub[None], row)[0]
    tokens = tokens.at[slot].set(first)
    keys = keys.at[slot].set(jax.random.key_data(key))
    return (self._placed(cache_lib.insert(cache, one, slot)),
            *self._whole(tokens, keys, first))

  def _step_impl(self, state, cache, tokens, keys, active, rows, *, window):
    """Feeds each active slot its last token and samples its next; idle rows keep theirs."""
    model = nnx.merge(self.graphdef, state)
    logits, cache = forward.decode_step(model, tokens, cache, active, window)
    split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))  # [B, 2]
    drawn = sample_rows(logits, split[:, 1], rows)
    tokens = jnp.where(active, drawn, tokens)
    keys = jnp.where(active[:, None], jax.random.key_data(split[:, 0]), keys)
    return self._placed(cache), *self._whole(tokens, keys)

  # -------------------------------------------------------------- mesh plumbing

  def _jit(self, fn, **kwargs):
    """`jax.jit(fn)`, traced and run under the mesh (the MoE then runs expert-parallel)."""
    return sharding.under_mesh(self.mesh, jax.jit(fn, **kwargs))

  def _put(self, value) -> jax.Array:
    """A host value as a replicated input."""
    if self.mesh is None:
      return jnp.asarray(value)
    return jax.device_put(np.asarray(value), sharding.replicated(self.mesh))

  def _whole(self, *values) -> tuple[jax.Array, ...]:
    """Results the host reads (or that every row needs), whole on every device."""
    if self.mesh is None:
      return values
    return tuple(jax.lax.with_sharding_constraint(v, sharding.replicated(self.mesh))
                 for v in values)

  def _placed(self, cache: LatentCache) -> LatentCache:
    """The cache laid out by the rule table (batch split when it divides the mesh)."""
    if self.mesh is None:
      return cache
    layout = sharding.logical_sharding(LATENT_AXES, cache.latent.shape, self.mesh)
    return LatentCache(jax.lax.with_sharding_constraint(cache.latent, layout),
                       *self._whole(cache.lengths))

