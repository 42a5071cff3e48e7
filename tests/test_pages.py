"""The host side of the paged cache: the page pool, prefix hashes and the scheduler, fuzzed
with a stand-in model (each next token a function of the tokens before it)."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallfour.inference.pages import OutOfPages, PagePool, page_hashes
from smallfour.inference.requests import Request, Ticket
from smallfour.inference.scheduler import Scheduler, Sequence


def test_page_hashes_chain_over_everything_before():
  a = page_hashes(list(range(20)), 4)
  assert len(a) == 5
  assert page_hashes(list(range(12)) + [99] * 8, 4)[:3] == a[:3]
  assert page_hashes([0] + list(range(1, 20)), 4, previous=a[:2]) == a
  changed = page_hashes([7] + list(range(1, 20)), 4)
  assert all(x != y for x, y in zip(a, changed))  # a change early reaches every later page
  salted = page_hashes(list(range(20)), 4, salt=b"image", salt_from=9)
  assert salted[:2] == a[:2] and all(x != y for x, y in zip(salted[2:], a[2:]))


def test_the_pool_reuses_lru_cached_pages_last():
  pool = PagePool(4, 2)
  a, b = pool.allocate(2)
  pool.publish(a, b"A")
  pool.publish(b, b"B")
  pool.release([b])
  pool.release([a])  # a released last: the most recently used
  assert pool.free_pages == 4 and pool.cached_pages == 2
  assert sorted(pool.allocate(2)) == [2, 3]  # never-used pages first
  assert pool.allocate(1) == [b]  # then the least recently used cached page
  assert pool.match([b"A", b"B"]) == [a]  # b was evicted: the chain breaks there
  with pytest.raises(OutOfPages):
    pool.allocate(1)
  pool.check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release", "publish", "match"]),
                          st.integers(0, 5)), max_size=60))
def test_the_pool_keeps_its_invariants(ops):
  pool = PagePool(6, 4)
  held: list[int] = []
  for op, n in ops:
    if op == "alloc" and n <= pool.free_pages:
      held += pool.allocate(n)
    elif op == "release" and held:
      pool.release([held.pop(n % len(held))])
    elif op == "publish" and held:
      pool.publish(held[n % len(held)], bytes([n]))
    elif op == "match":
      held += pool.match([bytes([k]) for k in range(n)])
    pool.check()
    assert pool.used_pages == len(set(held))


def _next_token(tokens: list[int]) -> int:
  return hashlib.blake2b(np.asarray(tokens, np.int64).tobytes()).digest()[0] % 5


def _simulate(prompts, max_new, *, pages, page_size, budget, batch, caching=True):
  """Runs the scheduler's plans with the stand-in model -> (outputs, scheduler)."""
  sched = Scheduler(max_batch=batch, num_pages=pages, page_size=page_size, max_tokens=budget,
                    prefix_caching=caching)
  seqs = [Sequence(Ticket(Request(tuple(p), max_new), lambda e: None, lambda t: None), list(p),
                   np.zeros(2, np.uint32)) for p in prompts]
  sched.waiting.extend(seqs)
  finished = set()
  for _ in range(10_000):
    plan = sched.plan()
    if not plan.decode and not plan.chunks:
      break
    assert len(plan.decode) + sum(c.size for c in plan.chunks) <= budget
    owners = [p for s in sched.running for p in s.pages[s.computed // page_size:]]
    assert len(owners) == len(set(owners))  # pages still to be written have one holder
    for s in plan.decode:
      sched.advanced(s, 1)
      s.generated += 1
      s.tokens.append(_next_token(s.tokens))
    for c in plan.chunks:
      sched.advanced(c.seq, c.size)
      if c.last:
        c.seq.generated += 1
        c.seq.tokens.append(_next_token(c.seq.tokens))
    for s in sched.running:
      if s.generated >= max_new:
        sched.release(s)
        finished.add(id(s))
    sched.pool.check()
  assert len(finished) == len(seqs), "the scheduler stopped with requests unserved"
  return [s.tokens[len(p):] for s, p in zip(seqs, prompts)], sched


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=30), min_size=1, max_size=6),
       st.integers(1, 12), st.sampled_from([2, 4]), st.integers(0, 24), st.integers(1, 4))
def test_any_pool_and_budget_gives_the_answers_of_a_roomy_one(prompts, max_new, page_size,
                                                               extra, batch):
  """Prompts over 3 ids share prefixes often; a pool just large enough for the longest
  request preempts, a roomy one without caching never does: the same tokens either way."""
  need = max(-(-(len(p) + max_new - 1) // page_size) for p in prompts)
  want, _ = _simulate(prompts, max_new, pages=64, page_size=page_size, budget=64, batch=6,
                      caching=False)
  got, sched = _simulate(prompts, max_new, pages=need + extra % 3, page_size=page_size,
                         budget=page_size + extra, batch=batch)
  assert got == want
  assert sched.pool.used_pages == 0
