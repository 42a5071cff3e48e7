"""Each step's decisions, on the host: who decodes, which prompt chunks run, whose pages.

A step is a token budget (`max_num_batched_tokens`): one decode token for every running
sequence whose prompt is in the cache, then chunks of prompts (those part-way first, then
waiting requests in arrival order, each taking a free slot) until the budget is spent. A
chunk continues from what is cached (whole pages: the prefix cache's hits, or earlier
chunks), so a long prompt delays running streams by at most one step's budget, and its
memory never depends on its length.

When the pool runs short for a running sequence, the most recently admitted one is
preempted: its pages are released (its full pages stay cached) and it waits again at the
front of the queue, to be recomputed from its prompt and what it generated (vLLM's
recompute preemption). Waiting requests are only admitted when their first chunk's pages
are free. Nothing here touches the device: `smallfour.inference.engine` runs the plan.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from smallfour.inference.pages import PagePool, page_hashes
from smallfour.inference.requests import Ticket


@dataclasses.dataclass(eq=False)
class Sequence:
  """A request while the engine holds it. `tokens`: its prompt, then each generated token;
  the cache holds the latents of the first `computed`."""

  ticket: Ticket
  tokens: list[int]
  key: np.ndarray  # [2] uint32: its PRNG key, advanced by its own draws only
  salt: bytes = b""  # its images' digest, mixed into the hashes of pages from salt_from on
  salt_from: int | None = None
  slot: int | None = None
  order: int = 0  # when it was (last) admitted: preemption takes the latest
  pages: list[int] = dataclasses.field(default_factory=list)
  hashes: list[bytes] = dataclasses.field(default_factory=list)
  computed: int = 0
  generated: int = 0
  admitted: bool = False  # ever (its cached_tokens are those of its first admission)
  image_rows: object = None  # its encoded images on the device, while its prompt is fed

  @property
  def fill_to(self) -> int:
    """Tokens to prefill: the prompt, or after a preemption all but the last generated
    one, which decode feeds."""
    return len(self.tokens) - (1 if self.generated else 0)

  @property
  def decoding(self) -> bool:
    return self.generated > 0 and self.computed == len(self.tokens) - 1


@dataclasses.dataclass
class Chunk:
  """Feed seq.tokens[start:start + size]; pages are allocated."""

  seq: Sequence
  start: int
  size: int

  @property
  def last(self) -> bool:
    """It completes the prompt: its logits give the first token."""
    return self.start + self.size == self.seq.fill_to and self.seq.generated == 0


@dataclasses.dataclass
class Plan:
  decode: list[Sequence]
  chunks: list[Chunk]


class Scheduler:
  """The queue, the slots and the page pool of one engine."""

  def __init__(self, *, max_batch: int, num_pages: int, page_size: int, max_tokens: int,
               prefix_caching: bool = True):
    if max_tokens < page_size:
      raise ValueError(f"max_num_batched_tokens ({max_tokens}) must be at least the page size "
                       f"({page_size}): chunks are whole pages")
    self.max_batch, self.page_size, self.max_tokens = max_batch, page_size, max_tokens
    self.pool = PagePool(num_pages, page_size, prefix_caching=prefix_caching)
    self.slots: list[Sequence | None] = [None] * max_batch
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.preemptions = 0
    self._admissions = 0

  @property
  def running(self) -> list[Sequence]:
    return [s for s in self.slots if s is not None]

  def plan(self) -> Plan:
    """This step's decode rows and prompt chunks, their pages allocated (preempting when
    the pool runs short for a running sequence, never for a waiting one)."""
    decode = []
    for seq in sorted((s for s in self.running if s.decoding), key=lambda s: s.order):
      if seq.slot is not None and self._grow(seq, seq.computed + 1):
        decode.append(seq)
    budget = self.max_tokens - len(decode)
    chunks = []
    for seq in sorted((s for s in self.running if not s.decoding), key=lambda s: s.order):
      if seq.slot is not None and (chunk := self._chunk(seq, budget)) is not None:
        chunks.append(chunk)
        budget -= chunk.size
    while budget > 0 and (chunk := self._admit(budget)) is not None:
      chunks.append(chunk)
      budget -= chunk.size
    alive = lambda s: s.slot is not None  # noqa: E731 - a later grow may have preempted it
    return Plan([s for s in decode if alive(s)], [c for c in chunks if alive(c.seq)])

  def _size(self, seq: Sequence, budget: int) -> int:
    """seq's next chunk within `budget` tokens: all that is left, or whole pages."""
    remaining = seq.fill_to - seq.computed
    size = min(remaining, budget)
    return size if size == remaining else size - size % self.page_size

  def _chunk(self, seq: Sequence, budget: int) -> Chunk | None:
    """seq's next chunk with its pages, or None (no budget, or seq was preempted)."""
    size = self._size(seq, budget)
    if size <= 0 or not self._grow(seq, seq.computed + size):
      return None
    return Chunk(seq, seq.computed, size)

  def _admit(self, budget: int) -> Chunk | None:
    """Moves the first waiting request into a free slot, its cached prefix matched, and
    plans its first chunk; None when none waits, no slot is free, or the chunk's pages are
    not free (waiting requests never preempt running ones)."""
    if not self.waiting or None not in self.slots:
      return None
    seq = self.waiting[0]
    seq.hashes = page_hashes(seq.tokens, self.page_size, salt=seq.salt,
                             salt_from=seq.salt_from, previous=seq.hashes)
    reusable = (seq.fill_to - (0 if seq.generated else 1)) // self.page_size
    seq.pages = self.pool.match(seq.hashes[:reusable])
    seq.computed = len(seq.pages) * self.page_size
    size = self._size(seq, budget)
    need = -(-(seq.computed + size) // self.page_size) - len(seq.pages)
    if (size <= 0 and seq.computed < seq.fill_to) or need > self.pool.free_pages:
      self.pool.release(seq.pages)
      self.pool.hit_tokens -= seq.computed
      seq.pages, seq.computed = [], 0
      return None
    self.waiting.popleft()
    if not seq.admitted:
      seq.ticket.cached_tokens = seq.computed
      seq.admitted = True
    seq.slot, seq.order = self.slots.index(None), self._admissions
    self._admissions += 1
    self.slots[seq.slot] = seq
    seq.pages += self.pool.allocate(max(need, 0))
    return Chunk(seq, seq.computed, size) if size > 0 else None

  def _grow(self, seq: Sequence, tokens: int) -> bool:
    """Gives seq pages for its first `tokens` tokens, preempting the latest admitted
    sequences while the pool is short. False if seq itself was preempted."""
    need = -(-tokens // self.page_size) - len(seq.pages)
    while need > self.pool.free_pages:
      victim = max(self.running, key=lambda s: s.order)
      self.preempt(victim)
      if victim is seq:
        return False
    if need > 0:
      seq.pages += self.pool.allocate(need)
    return True

  def preempt(self, seq: Sequence) -> None:
    """Frees seq's slot and pages; it waits again, first in line, to be recomputed."""
    self.release(seq)
    self.waiting.appendleft(seq)
    self.preemptions += 1

  def release(self, seq: Sequence) -> None:
    """Frees seq's slot and its pages (full ones stay cached)."""
    self.pool.release(seq.pages)
    seq.pages, seq.computed, seq.image_rows = [], 0, None
    if seq.slot is not None:
      self.slots[seq.slot] = None
      seq.slot = None

  def advanced(self, seq: Sequence, tokens: int) -> None:
    """seq's cache now holds `tokens` more tokens; its newly full pages are published."""
    before = seq.computed // self.page_size
    seq.computed += tokens
    full = seq.computed // self.page_size
    if full > before:
      seq.hashes = page_hashes(seq.tokens[:full * self.page_size], self.page_size,
                               salt=seq.salt, salt_from=seq.salt_from,
                               previous=seq.hashes[:full])
      for i in range(before, full):
        self.pool.publish(seq.pages[i], seq.hashes[i])

