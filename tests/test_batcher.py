"""Continuous batching: answers independent of the batch, slots freed, faults reported."""

import threading

import pytest
from flax import nnx

from smallfour import configs, sharding
from smallfour.inference.batcher import Batcher, EngineFailed, Event, QueueFull, Request
from smallfour.inference.engine import Engine, RequestError
from smallfour.inference.sampling import Sampling
from smallfour.nn.decoder import Transformer

PROMPTS = [tuple(range(3, 33)), (7, 1, 99, 4, 250, 31, 8), (5,) * 20, (1000, 2000, 3000),
           tuple(range(500, 512))]
MAX_LEN = 64


@pytest.fixture(scope="module")
def model():
  return Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def batcher(model):
  return Batcher(model, max_batch=3, max_len=MAX_LEN, prefill_chunk=16)


def test_concurrent_greedy_answers_equal_each_alone(batcher):
  """Five requests on three slots, two joining mid-way: slots are reused, rows are mixed."""
  requests = [Request(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)]
  alone = [batcher.generate([r])[0] for r in requests]
  results = [[] for _ in requests]
  tickets = [batcher.submit(r, results[i].append) for i, r in enumerate(requests[:3])]
  for _ in range(4):
    batcher.step()
  tickets += [batcher.submit(r, results[i + 3].append) for i, r in enumerate(requests[3:])]
  while batcher.step():
    pass
  for got, (tokens, finish) in zip(results, alone):
    assert [e.token for e in got] == tokens
    assert [e.finish_reason for e in got] == [None] * (len(tokens) - 1) + [finish]
  assert [len(t) for t, _ in alone] == [r.max_new_tokens for r in requests]
  assert batcher.active == 0 and batcher.waiting == 0


def test_greedy_equals_the_static_engine(model, batcher):
  want = Engine(model, max_len=MAX_LEN, prefill_chunk=16).generate(
      [list(p) for p in PROMPTS], 10)
  got = batcher.generate([Request(p, 10) for p in PROMPTS])
  assert [tokens for tokens, _ in got] == want


def test_sampling_is_per_slot(batcher):
  """Each slot draws with its own parameters and seed, whatever its neighbours do."""
  mixed = [Request(PROMPTS[0], 8, Sampling(0.9, top_k=40, top_p=0.8), seed=5),
           Request(PROMPTS[1], 8),
           Request(PROMPTS[2], 8, Sampling(1.3), seed=7),
           Request(PROMPTS[0], 8, Sampling(0.9, top_k=40, top_p=0.8), seed=6)]
  together = batcher.generate(mixed)
  assert together == [batcher.generate([r])[0] for r in mixed]
  assert together[0] != together[3]  # the seed matters


def test_eos_stops_and_frees_the_slot(batcher, monkeypatch):
  (tokens, _), = batcher.generate([Request(PROMPTS[1], 6)])
  monkeypatch.setattr(batcher, "eos_id", tokens[2])  # as if the model's EOS were that token
  (got, finish), = batcher.generate([Request(PROMPTS[1], 6)])
  assert (got, finish) == (tokens[:tokens.index(tokens[2]) + 1], "stop")
  assert batcher.active == 0


def test_a_full_cache_ends_with_length(batcher):
  prompt = tuple(range(1000, 1000 + MAX_LEN - 2))
  (tokens, finish), = batcher.generate([Request(prompt, 50)])
  assert len(tokens) == 3 and finish == "length"  # two fed back, the third has no room


def test_cancel_frees_the_slot_before_the_next_step(batcher):
  events = []
  ticket = batcher.submit(Request(PROMPTS[0], 40), events.append)
  batcher.step()
  batcher.step()
  assert batcher.active == 1
  ticket.cancel()
  waiting = batcher.submit(Request(PROMPTS[1], 40), events.append)
  waiting.cancel()
  assert not batcher.step()
  assert batcher.active == 0 and batcher.waiting == 0
  assert [e.finish_reason for e in events][-2:] == ["cancelled", "cancelled"]


@pytest.mark.parametrize("request_, why", [
    (Request((), 4), "empty"),
    (Request(tuple(range(MAX_LEN + 1)), 4), "the cache holds 64"),
    (Request((1, 131072), 4), "outside"),
    (Request((1, 2), 0), "max_new_tokens"),
    (Request((1, 2), 4, seed=-1), "seed"),
])
def test_bad_requests_are_refused_before_any_work(batcher, request_, why):
  with pytest.raises(RequestError, match=why):
    batcher.submit(request_, lambda e: None)
  assert batcher.waiting == 0


def test_a_full_queue_refuses(model):
  b = Batcher(model, max_batch=1, max_len=MAX_LEN, prefill_chunk=16, max_queue=2)
  for _ in range(3):  # one for the free slot, two waiting
    b.submit(Request(PROMPTS[1], 4), lambda e: None)
  with pytest.raises(QueueFull):
    b.submit(Request(PROMPTS[1], 4), lambda e: None)


def _waiter():
  """A sink that keeps the events and an Event set by the last one."""
  done, got = threading.Event(), []

  def sink(event: Event):
    got.append(event)
    if event.finish_reason:
      done.set()

  return sink, done, got


def test_the_engine_thread_serves(batcher):
  want = batcher.generate([Request(PROMPTS[1], 5)])[0][0]
  sink, done, got = _waiter()
  batcher.start()
  try:
    batcher.submit(Request(PROMPTS[1], 5), sink)
    assert done.wait(60)
  finally:
    batcher.stop(timeout=60)
  assert [e.token for e in got] == want


def test_an_engine_failure_reaches_every_client(model, monkeypatch):
  b = Batcher(model, max_batch=2, max_len=MAX_LEN, prefill_chunk=16)

  def boom():
    raise RuntimeError("device lost")

  monkeypatch.setattr(b, "step", boom)
  failed = threading.Event()
  sink, done, got = _waiter()
  b.start(on_failure=lambda e: failed.set())
  b.submit(Request(PROMPTS[1], 5), sink)
  assert failed.wait(60) and done.wait(60)
  assert got[-1].finish_reason == "error" and "device lost" in got[-1].error
  with pytest.raises(EngineFailed):
    b.submit(Request(PROMPTS[1], 5), sink)
  b.stop(timeout=60)


@pytest.mark.slow
def test_a_mesh_gives_the_same_answers(model, batcher):
  """Experts split over 2 devices (expert-parallel MoE), the cache placed by the rule table."""
  requests = [Request(PROMPTS[1], 6), Request(PROMPTS[3], 6)]  # one bucket, one window
  mesh = sharding.make_mesh({"data": 1, "expert": 2, "tensor": 1}, model.cfg)
  placed = sharding.init_sharded(lambda: Transformer(model.cfg, rngs=nnx.Rngs(3)), mesh)
  on_mesh = Batcher(placed, max_batch=3, max_len=MAX_LEN, prefill_chunk=16, mesh=mesh)
  assert on_mesh.generate(requests) == batcher.generate(requests)
