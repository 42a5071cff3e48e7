"""The page pool's bookkeeping, on the host: free pages, who holds which, and the prefix cache.

The latent cache is a pool of fixed-size pages (`smallfour.inference.paged`); a sequence
holds a list of them (its page table). A page that is full is keyed by a hash chained over
every token before it and in it (and the content of any image among them, `page_hashes`),
so two sequences that start alike share their first pages: a shared system prompt or the
earlier turns of a conversation are computed once. Pages are reference counted; a hashed
page nobody holds any more stays in the cache, reusable until it is evicted, least recently
released first, when the pool needs room (vLLM's automatic prefix caching).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np


class OutOfPages(RuntimeError):
  """The pool has fewer free pages than asked for."""


def page_hashes(tokens: Sequence[int], page_size: int, *, salt: bytes = b"",
                salt_from: int | None = None, previous: Sequence[bytes] = ()) -> list[bytes]:
  """The chained hash of every full page of `tokens`.

  Hash i covers tokens[: (i + 1) * page_size]. `salt` (a digest of the request's images) is
  mixed into every page from the one holding token `salt_from` on (the first image token):
  the pages before an image are shared with any request, those after only with requests
  bearing the same images. `previous`: hashes already computed for a prefix of these
  pages, extended rather than recomputed.
  """
  out = list(previous)
  ids = np.asarray(tokens, np.int64)
  for i in range(len(out), len(tokens) // page_size):
    h = hashlib.blake2b(out[-1] if out else b"smallfour", digest_size=16)
    h.update(ids[i * page_size:(i + 1) * page_size].tobytes())
    if salt_from is not None and salt_from < (i + 1) * page_size:
      h.update(salt)
    out.append(h.digest())
  return out


class PagePool:
  """Allocation, sharing and reuse of `num_pages` pages of `page_size` tokens."""

  def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"a pool needs pages (got {num_pages}) of >= 1 token (got {page_size})")
    self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
    self._free = list(range(num_pages - 1, -1, -1))  # unhashed pages; pop() takes the lowest
    self._refs = [0] * num_pages
    self._hash_of: dict[int, bytes] = {}  # page -> the hash of the tokens it holds
    self._page_of: dict[bytes, int] = {}  # hash -> page
    self._unused: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
    self.hit_tokens = 0  # tokens served from the cache, ever (a counter for /metrics)

  @property
  def free_pages(self) -> int:
    """Pages that can be handed out now (never used, or cached and held by nobody)."""
    return len(self._free) + len(self._unused)

  @property
  def used_pages(self) -> int:
    """Pages some sequence holds."""
    return self.num_pages - self.free_pages

  @property
  def cached_pages(self) -> int:
    """Hashed pages, held or not: what the prefix cache can serve."""
    return len(self._page_of)

  def match(self, hashes: Sequence[bytes]) -> list[int]:
    """The pages holding the longest prefix of `hashes`, referenced for the caller."""
    pages = []
    if self.prefix_caching:
      for h in hashes:
        page = self._page_of.get(h)
        if page is None:
          break
        pages.append(page)
    for page in pages:
      self._unused.pop(page, None)
      self._refs[page] += 1
    self.hit_tokens += len(pages) * self.page_size
    return pages

  def allocate(self, n: int) -> list[int]:
    """`n` pages for the caller, fresh ones first, then the least recently used cached ones.
    Raises OutOfPages (and takes nothing) when fewer are free."""
    if n > self.free_pages:
      raise OutOfPages(f"{n} pages asked for, {self.free_pages} free of {self.num_pages}")
    pages = []
    for _ in range(n):
      if self._free:
        page = self._free.pop()
      else:
        page, _ = self._unused.popitem(last=False)
        del self._page_of[self._hash_of.pop(page)]
      self._refs[page] = 1
      pages.append(page)
    return pages

  def release(self, pages: Sequence[int]) -> None:
    """Drops the caller's reference to each page; hashed ones stay cached until evicted."""
    for page in pages:
      self._refs[page] -= 1
      if self._refs[page] < 0:
        raise AssertionError(f"page {page} released more often than taken")
      if self._refs[page] == 0:
        if page in self._hash_of:
          self._unused[page] = None  # the most recently used end
        else:
          self._free.append(page)

  def publish(self, page: int, page_hash: bytes) -> None:
    """Records that `page` (held by the caller) is full and holds the tokens `page_hash`
    names, so later sequences can share it. A page whose tokens are cached already under
    another page stays private (freed, not cached, when released)."""
    if self.prefix_caching and page_hash not in self._page_of and page not in self._hash_of:
      self._page_of[page_hash] = page
      self._hash_of[page] = page_hash

  def check(self) -> None:
    """Asserts the pool's invariants (tests)."""
    held = {p for p in range(self.num_pages) if self._refs[p] > 0}
    free, unused = set(self._free), set(self._unused)
    assert len(free) == len(self._free) and not free & unused and not held & (free | unused)
    assert held | free | unused == set(range(self.num_pages))
    assert unused <= set(self._hash_of) and not free & set(self._hash_of)
    assert {self._page_of[h] for h in self._page_of} == set(self._hash_of)
