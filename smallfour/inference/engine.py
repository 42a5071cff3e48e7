"""The one engine: requests in, tokens out, over a paged latent cache.

    engine = Engine(model, max_len=4096, max_batch=8)            # + mesh=, page_size=, ...
    engine.generate([prompt_ids], max_new_tokens=64)             # the CLI, the notebooks
    ticket = engine.submit(Request(prompt, 64), sink)            # the server: sink(Event)
    engine.start()                                               # its thread (or step())

Each `step()` runs what the scheduler (`smallfour.inference.scheduler`) plans: chunks of
prompts within the step's token budget, each continuing from what is cached, then one
decode token for every running sequence, in one compiled call whose rows are bucketed to a
power of two. Each row carries its request's sampling parameters as arrays and its own PRNG key,
drawn from the request's seed and advanced only by its own draws: a request's tokens do not
depend on what else runs (up to the float rounding of the batch's shape). A request whose own pass fails (a shape that does
not compile, memory its prompt chunk cannot get) fails alone; a failing decode step fails
the engine, and every request hears of it.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence as Seq

import jax
import numpy as np

from smallfour.inference import paged
from smallfour.inference.paged import PagedModel
from smallfour.inference.requests import (GREEDY, EngineFailed, Event, QueueFull, Request,
                                          RequestError, Sink, Ticket)
from smallfour.inference.sampling import Sampling, SamplingRows
from smallfour.inference.scheduler import Chunk, Scheduler, Sequence
from smallfour.nn import multimodal
from smallfour.nn.decoder import Transformer

__all__ = ["Engine", "EngineFailed", "Event", "QueueFull", "Request", "RequestError"]


class Engine:
  """Serves `Request`s from `max_batch` slots over a pool of `cache_tokens` cached tokens."""

  def __init__(self, model: Transformer, *, max_len: int, max_batch: int = 8,
               page_size: int = 16, cache_tokens: int | None = None,
               max_num_batched_tokens: int = 512, prefix_caching: bool = True,
               max_queue: int | None = None, eos_id: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
    """max_len: tokens one sequence may hold (prompt and answer); cache_tokens: tokens the
    pool holds, in whole pages (default max_batch × max_len, each sequence's rounded up to
    whole pages); max_num_batched_tokens: a step's budget;
    max_queue: requests that may wait while every slot is busy (None: no limit); eos_id:
    the stop token (default the config's); mesh: where the parameters live."""
    if min(max_len, max_batch, page_size, cache_tokens or 1) < 1:
      raise ValueError("max_len, max_batch, page_size and cache_tokens must be positive")
    if page_size & (page_size - 1):
      raise ValueError(f"page_size must be a power of two, got {page_size}")
    num_pages = (max_batch * -(-max_len // page_size) if cache_tokens is None
                 else -(-cache_tokens // page_size))
    self.cfg = model.cfg
    self.eos_id = model.cfg.eos_token_id if eos_id is None else eos_id
    self.max_len, self.max_batch, self.max_queue = max_len, max_batch, max_queue
    self.page_size, self.mesh = page_size, mesh
    self.paged = PagedModel(model, num_pages=num_pages, page_size=page_size, mesh=mesh)
    self.scheduler = Scheduler(max_batch=max_batch, num_pages=num_pages,
                               page_size=page_size, max_tokens=max_num_batched_tokens,
                               prefix_caching=prefix_caching)
    self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
    # A sequence's most pages, as a power of two: the widest decode window, and the width
    # of every chunk's page table (chunks read only the pages they reach, so one width
    # serves them all and each chunk size compiles once).
    self._max_pages = paged.bucket(-(-max_len // page_size))
    self._pool = self.paged.zeros()
    self._lock = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.failure: BaseException | None = None

  # ------------------------------------------------------------------ requests

  def validate(self, request: Request, name: str = "the prompt") -> None:
    """Raises RequestError naming what is wrong (`name`: how to call the prompt); nothing
    is computed."""
    n = len(request.prompt)
    if n == 0:
      raise RequestError(f"{name} is empty")
    if n > self.max_len:
      raise RequestError(f"{name} has {n} tokens; a sequence holds {self.max_len}")
    if request.max_new_tokens < 1:
      raise RequestError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if not 0 <= request.seed < 2**32:
      raise RequestError(f"seed must be in [0, 2**32), got {request.seed}")
    bad = [t for t in request.prompt if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise RequestError(f"{name} has token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
    cached = min(n + request.max_new_tokens - 1, self.max_len)
    pages = -(-cached // self.page_size)
    if pages > self.scheduler.pool.num_pages:
      raise RequestError(f"{name} and max_new_tokens need {cached} cached tokens; the "
                         f"pool holds {self.scheduler.pool.num_pages * self.page_size}")
    self._validate_images(request, name)

  def _validate_images(self, request: Request, name: str) -> None:
    if not request.images:
      return
    vision = self.cfg.vision
    if vision is None:
      raise RequestError(f"{name} has images, but the model has no vision encoder")
    placeholders = sum(int(t) == vision.image_token_id for t in request.prompt)
    rows = 0
    for j, pixels in enumerate(request.images):
      try:
        r, c = multimodal.grid(pixels, vision)
      except ValueError as e:
        raise RequestError(f"{name}, image {j}: {e}") from None
      rows += r * c
    if rows != placeholders:
      raise RequestError(f"{name} has {placeholders} [IMG] tokens but its "
                         f"{len(request.images)} image(s) make {rows} image tokens")

  def submit(self, request: Request, sink: Sink) -> Ticket:
    """Queues `request`; `sink` is called from the engine thread with each `Event`.
    Raises RequestError, QueueFull or EngineFailed, and then queues nothing."""
    self.validate(request)
    ticket = Ticket(request, sink, self._cancel)
    key = np.asarray(jax.random.key_data(jax.random.key(request.seed)), np.uint32)
    seq = Sequence(ticket, list(request.prompt), key)
    if request.images:
      first = request.prompt.index(self.cfg.vision.image_token_id)
      seq.salt, seq.salt_from = request.image_digest(), first
    with self._lock:
      if self.failure is not None:
        raise EngineFailed(f"the engine failed: {self.failure!r}")
      free = self.max_batch - self.active
      if self.max_queue is not None and self.waiting >= free + self.max_queue:
        raise QueueFull(f"all {self.max_batch} slots are busy and {self.max_queue} requests "
                        "already wait")
      self.scheduler.waiting.append(seq)
      self._lock.notify()
    return ticket

  def _cancel(self, ticket: Ticket) -> None:
    """A waiting request leaves the queue now; a running one is freed by the next step."""
    with self._lock:
      for seq in self.scheduler.waiting:
        if seq.ticket is ticket:
          self.scheduler.waiting.remove(seq)
          ticket.sink(Event(finish_reason="cancelled"))
          break
      self._lock.notify()

  @property
  def context_tokens(self) -> int:
    """The most tokens one sequence can hold: max_len, or the pool if smaller."""
    return min(self.max_len, self.scheduler.pool.num_pages * self.page_size)

  @property
  def active(self) -> int:
    """Requests holding a slot."""
    return len(self.scheduler.running)

  @property
  def waiting(self) -> int:
    return len(self.scheduler.waiting)

  # ------------------------------------------------------------ one-shot use

  def run(self, requests: Seq[Request]) -> list[tuple[list[int], str]]:
    """Runs `requests` together in this thread -> (tokens, finish_reason) per request.
    Not while the engine thread runs."""
    results = [([], None) for _ in requests]

    def sink(i):
      def on(event: Event):
        if event.token is not None:
          results[i][0].append(event.token)
        if event.finish_reason is not None:
          results[i] = (results[i][0], event.finish_reason)
          if event.finish_reason == "error":
            raise RequestError(event.error)
      return on

    for i, r in enumerate(requests):
      self.submit(r, sink(i))
    while self.step():
      pass
    return results

  def generate(self, prompts: Seq[Seq[int]], max_new_tokens: int,
               sampling: Sampling = GREEDY, seed: int = 0,
               images: Seq[Seq[np.ndarray]] | None = None) -> list[list[int]]:
    """Up to `max_new_tokens` per prompt (EOS kept; a full context stops it too), each
    prompt with `seed` as if alone. `images`: per prompt, its preprocessed images."""
    return [t for t, _ in self.run(self._requests(prompts, max_new_tokens, sampling, seed,
                                                  images))]

  def stream(self, prompts: Seq[Seq[int]], max_new_tokens: int,
             sampling: Sampling = GREEDY, seed: int = 0,
             images: Seq[Seq[np.ndarray]] | None = None) -> Iterator[list[int | None]]:
    """The same generation yielded token by token: the i-th token of every prompt (None
    once a prompt has stopped). Equal, token for token, to `generate`."""
    requests = self._requests(prompts, max_new_tokens, sampling, seed, images)
    got: list[list[int]] = [[] for _ in requests]
    done = [False] * len(requests)

    def sink(i):
      def on(event: Event):
        if event.token is not None:
          got[i].append(event.token)
        if event.finish_reason is not None:
          done[i] = True
      return on

    for i, r in enumerate(requests):
      self.submit(r, sink(i))
    for i in range(max_new_tokens):
      while not all(done[j] or len(got[j]) > i for j in range(len(requests))):
        self.step()
      if all(len(g) <= i for g in got):
        return
      yield [g[i] if len(g) > i else None for g in got]

  def _requests(self, prompts, max_new_tokens, sampling, seed, images) -> list[Request]:
    if not prompts:
      raise RequestError("no prompts given")
    if images is not None and len(images) != len(prompts):
      raise RequestError(f"{len(images)} image lists for {len(prompts)} prompts")
    requests = [Request(tuple(int(t) for t in p), max_new_tokens, sampling, seed,
                        tuple(images[i]) if images else ()) for i, p in enumerate(prompts)]
    for i, r in enumerate(requests):
      self.validate(r, f"prompt {i}")
    return requests

  def warmup(self) -> list[tuple[str, int, int]]:
    """Compiles the decode step for every batch bucket and window and every chunk size
    (each at the one table width chunks use), writing only the sink page. Returns the
    shapes ("decode", batch, pages) and ("chunk", tokens, pages). Not while the engine
    thread runs."""
    windows = [1 << i for i in range(self._max_pages.bit_length())]
    batches = sorted({min(self.max_batch, 1 << i)
                      for i in range(paged.bucket(self.max_batch).bit_length())})
    shapes = []
    keys = np.zeros((self.max_batch, 2), np.uint32)
    for b in batches:
      zeros, rows = np.zeros(b, np.int32), SamplingRows.of([GREEDY] * b)
      for n in windows:
        table = np.full((b, n), self.paged.sink, np.int32)
        self._pool, *_ = self.paged.decode(self._pool, zeros, zeros, table, keys[:b], rows)
        shapes.append(("decode", b, n))
    for size in paged.chunk_sizes(self.scheduler.max_tokens, self.page_size):
      self._pool, *_ = self.paged.extend(self._pool, np.zeros(size, np.int32), 0,
                                         np.zeros(0, np.int32), keys[0],
                                         SamplingRows.of([GREEDY]), width=self._max_pages)
      shapes.append(("chunk", size, self._max_pages))
    jax.block_until_ready(self._pool)
    return shapes

  # -------------------------------------------------------------- the engine loop

  def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
    """Runs the engine in a daemon thread until `stop()`. If a step raises, every request
    gets an "error" event, later submits raise EngineFailed and `on_failure` is called."""
    self._stopping = False
    self._thread = threading.Thread(target=self._run, args=(on_failure,),
                                    name="smallfour-engine", daemon=True)
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
          while not self._stopping and not self.waiting and not self.active:
            self._lock.wait()
          if self._stopping:
            return
        if not self.step():
          with self._lock:  # requests wait for pages nobody frees: only a cancel helps
            if not self._stopping:
              self._lock.wait(0.05)
    except BaseException as e:  # noqa: BLE001 - every client must hear of it
      with self._lock:
        self.failure = e
        seqs = self.scheduler.running + list(self.scheduler.waiting)
        for seq in self.scheduler.running:
          self.scheduler.release(seq)
        self.scheduler.waiting.clear()
      for seq in seqs:
        seq.ticket.sink(Event(finish_reason="error", error=f"the engine failed: {e!r}"))
      if on_failure is not None:
        on_failure(e)

  def step(self) -> bool:
    """Frees cancelled requests, then runs one step's plan: prompt chunks within the
    budget and a decode token for every running sequence. False when nothing ran."""
    for seq in self.scheduler.running:
      if seq.ticket.cancelled:
        self._free(seq)
        seq.ticket.sink(Event(finish_reason="cancelled"))
    with self._lock:
      plan = self.scheduler.plan()
    # Chunks first: a prompt completed in this step has its first token one decode pass
    # sooner, and the running streams' tokens are as far apart as the steps either way.
    for chunk in plan.chunks:
      self._feed(chunk)
    if plan.decode:
      self._decode(plan.decode)
    return bool(plan.decode or plan.chunks)

  def _decode(self, seqs: list[Sequence]) -> None:
    """One token for each of `seqs`, as the first rows of a batch bucketed to a power of
    two (at most max_batch): a step's cost follows the sequences decoding, not the slots."""
    b, p = min(self.max_batch, paged.bucket(len(seqs))), self.page_size
    width = paged.bucket(max(-(-(s.computed + 1) // p) for s in seqs))
    tokens, positions = np.zeros(b, np.int32), np.zeros(b, np.int32)
    table = np.full((b, width), self.paged.sink, np.int32)
    keys = np.zeros((b, 2), np.uint32)
    for i, s in enumerate(seqs):
      tokens[i], positions[i], keys[i] = s.tokens[-1], s.computed, s.key
      table[i, :len(s.pages)] = s.pages
    rows = SamplingRows.of([s.ticket.request.sampling for s in seqs] +
                           [GREEDY] * (b - len(seqs)))  # padding rows draw greedily: free
    self._pool, drawn, keys = self.paged.decode(self._pool, tokens, positions, table, keys,
                                                rows)
    drawn, keys = np.asarray(drawn), np.asarray(keys)
    for i, s in enumerate(seqs):
      s.key = keys[i]
      self.scheduler.advanced(s, 1)
      self._deliver(s, int(drawn[i]))

  def _feed(self, chunk: Chunk) -> None:
    """Runs one prompt chunk; its first token comes with the prompt's last chunk. A
    failure that leaves the pool intact fails this request alone."""
    seq = chunk.seq
    try:
      images, offset = self._images(seq, chunk.start)
      self._pool, drawn, key = self.paged.extend(
          self._pool, np.asarray(seq.tokens[chunk.start:chunk.start + chunk.size], np.int32),
          chunk.start, np.asarray(seq.pages, np.int32), seq.key,
          SamplingRows.of([seq.ticket.request.sampling]), images, offset,
          width=self._max_pages)
      drawn, key = int(np.asarray(drawn)[0]), np.asarray(key)[0]
    except Exception as e:  # noqa: BLE001 - confined to this request unless the pool is gone
      if self._pool.is_deleted():
        raise
      self._free(seq)
      seq.ticket.sink(Event(finish_reason="error", error=f"prefill failed: {e!r}"))
      return
    self.scheduler.advanced(seq, chunk.size)
    if chunk.last:
      self.stats["prompt_tokens"] += len(seq.ticket.request.prompt)
      seq.key, seq.image_rows = key, None
      self._deliver(seq, drawn)

  def _images(self, seq: Sequence, start: int) -> tuple[jax.Array | None, int]:
    """seq's encoded images (encoded once per admission) and how many [IMG] tokens come
    before position `start`."""
    request = seq.ticket.request
    if not request.images:
      return None, 0
    if seq.image_rows is None:
      seq.image_rows = self.paged.encode(request.images)
    image_id = self.cfg.vision.image_token_id
    return seq.image_rows, sum(t == image_id for t in request.prompt[:start])

  def _deliver(self, seq: Sequence, token: int) -> None:
    """Hands seq its new token, and frees it when that was its last."""
    seq.generated += 1
    seq.tokens.append(token)
    self.stats["generation_tokens"] += 1
    finish = None
    if token == self.eos_id:
      finish = "stop"
    elif seq.generated >= seq.ticket.request.max_new_tokens or len(seq.tokens) > self.max_len:
      finish = "length"  # or the context has no room to feed the token back
    if finish is not None:
      self._free(seq)
    seq.ticket.sink(Event(token, finish))

  def _free(self, seq: Sequence) -> None:
    with self._lock:
      self.scheduler.release(seq)
