"""The engine: answers independent of the batch and of paging, prefix caching, preemption,
chunked prefill, slots freed, faults reported."""

import threading

import jax.numpy as jnp
import pytest
from flax import nnx

from smallfour import configs, sharding
from smallfour.inference import forward
from smallfour.inference.engine import Engine
from smallfour.inference.requests import EngineFailed, Event, QueueFull, Request, RequestError
from smallfour.inference.sampling import Sampling
from smallfour.nn.decoder import Transformer

PROMPTS = [tuple(range(3, 33)), (7, 1, 99, 4, 250, 31, 8), (5,) * 20, (1000, 2000, 3000),
           tuple(range(500, 512))]
MAX_LEN = 64


@pytest.fixture(scope="module")
def model():
  return Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(3))


def make(model, **kwargs):
  return Engine(model, **{"max_batch": 3, "max_len": MAX_LEN, "page_size": 8,
                          "max_num_batched_tokens": 32, **kwargs})


@pytest.fixture(scope="module")
def engine(model):
  return make(model)


def test_concurrent_greedy_answers_equal_each_alone(engine):
  """Five requests on three slots, two joining mid-way: slots are reused, rows are mixed."""
  requests = [Request(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)]
  alone = [engine.run([r])[0] for r in requests]
  results = [[] for _ in requests]
  tickets = [engine.submit(r, results[i].append) for i, r in enumerate(requests[:3])]
  for _ in range(4):
    engine.step()
  tickets += [engine.submit(r, results[i + 3].append) for i, r in enumerate(requests[3:])]
  while engine.step():
    pass
  for got, (tokens, finish) in zip(results, alone):
    assert [e.token for e in got] == tokens
    assert [e.finish_reason for e in got] == [None] * (len(tokens) - 1) + [finish]
  assert [len(t) for t, _ in alone] == [r.max_new_tokens for r in requests]
  assert engine.active == 0 and engine.waiting == 0


def _contiguous_greedy(model, prompt, n):
  """Greedy tokens from the contiguous cache (forward.prefill + decode_step), unpaged."""
  tokens = jnp.asarray([prompt + (0,) * (32 - len(prompt))], jnp.int32)
  logits, cache = nnx.jit(forward.prefill, static_argnums=(3, 4))(
      model, tokens, jnp.asarray([len(prompt)]), MAX_LEN, 32)
  step = nnx.jit(forward.decode_step)
  out = [int(jnp.argmax(logits[0]))]
  for _ in range(n - 1):
    logits, cache = step(model, jnp.asarray(out[-1:]), cache, jnp.ones(1, bool))
    out.append(int(jnp.argmax(logits[0])))
  return out


def test_greedy_equals_the_contiguous_cache(model, engine):
  """Paged, chunked (budget 32: the 30-token prompt in one chunk, pages of 8) = contiguous."""
  want = [_contiguous_greedy(model, p, 10) for p in PROMPTS]
  got = engine.run([Request(p, 10) for p in PROMPTS])
  assert [tokens for tokens, _ in got] == want


def test_sampling_is_per_slot(engine):
  """Each slot draws with its own parameters and seed, whatever its neighbours do."""
  mixed = [Request(PROMPTS[0], 8, Sampling(0.9, top_k=40, top_p=0.8), seed=5),
           Request(PROMPTS[1], 8),
           Request(PROMPTS[2], 8, Sampling(1.3), seed=7),
           Request(PROMPTS[0], 8, Sampling(0.9, top_k=40, top_p=0.8), seed=6)]
  together = engine.run(mixed)
  assert together == [engine.run([r])[0] for r in mixed]
  assert together[0] != together[3]  # the seed matters


def test_eos_stops_and_frees_the_slot(engine, monkeypatch):
  (tokens, _), = engine.run([Request(PROMPTS[1], 6)])
  monkeypatch.setattr(engine, "eos_id", tokens[2])  # as if the model's EOS were that token
  (got, finish), = engine.run([Request(PROMPTS[1], 6)])
  assert (got, finish) == (tokens[:tokens.index(tokens[2]) + 1], "stop")
  assert engine.active == 0


def test_a_full_cache_ends_with_length(engine):
  prompt = tuple(range(1000, 1000 + MAX_LEN - 2))
  (tokens, finish), = engine.run([Request(prompt, 50)])
  assert len(tokens) == 3 and finish == "length"  # two fed back, the third has no room


def test_cancel_frees_the_slot_before_the_next_step(engine):
  events = []
  ticket = engine.submit(Request(PROMPTS[0], 40), events.append)
  engine.step()
  engine.step()
  assert engine.active == 1
  ticket.cancel()
  waiting = engine.submit(Request(PROMPTS[1], 40), events.append)
  waiting.cancel()
  assert engine.waiting == 0 and events[-1].finish_reason == "cancelled"  # at once
  assert not engine.step()
  assert engine.active == 0 and engine.waiting == 0
  assert [e.finish_reason for e in events][-2:] == ["cancelled", "cancelled"]


@pytest.mark.parametrize("request_, why", [
    (Request((), 4), "empty"),
    (Request(tuple(range(MAX_LEN + 1)), 4), "a sequence holds 64"),
    (Request((1, 131072), 4), "outside"),
    (Request((1, 2), 0), "max_new_tokens"),
    (Request((1, 2), 4, seed=-1), "seed"),
])
def test_bad_requests_are_refused_before_any_work(engine, request_, why):
  with pytest.raises(RequestError, match=why):
    engine.submit(request_, lambda e: None)
  assert engine.waiting == 0


def test_a_full_queue_refuses(model):
  b = make(model, max_batch=1, max_queue=2)
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


def test_the_engine_thread_serves(engine):
  want = engine.run([Request(PROMPTS[1], 5)])[0][0]
  sink, done, got = _waiter()
  engine.start()
  try:
    engine.submit(Request(PROMPTS[1], 5), sink)
    assert done.wait(60)
  finally:
    engine.stop(timeout=60)
  assert [e.token for e in got] == want


def test_an_engine_failure_reaches_every_client(model, monkeypatch):
  b = make(model, max_batch=2)

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
def test_a_mesh_gives_the_same_answers(model, engine):
  """Experts split over 2 devices (expert-parallel MoE), the pool placed by the rule table;
  a pool of 8 pages makes the three requests preempt, and the third shares its first two
  pages with the first."""
  requests = [Request(PROMPTS[0], 20), Request(PROMPTS[3], 30), Request(PROMPTS[0][:20], 6)]
  mesh = sharding.make_mesh({"data": 1, "expert": 2, "tensor": 1}, model.cfg)
  placed = sharding.init_sharded(lambda: Transformer(model.cfg, rngs=nnx.Rngs(3)), mesh)
  on_mesh = make(placed, mesh=mesh, cache_tokens=64)
  assert on_mesh.run(requests) == engine.run(requests)
  assert on_mesh.scheduler.preemptions > 0 and on_mesh.scheduler.pool.hit_tokens > 0


def test_warmup_compiles_every_shape_requests_meet(model):
  engine = make(model)
  shapes = engine.warmup()
  compiled = lambda: (engine.paged._decode_jit._cache_size(),  # noqa: E731
                      engine.paged._extend_jit._cache_size())
  before = compiled()
  assert before == (sum(k == "decode" for k, *_ in shapes), sum(k == "chunk" for k, *_ in shapes))
  engine.run([Request(p, 12) for p in PROMPTS] + [Request(tuple(range(100, 160)), 4)])
  assert compiled() == before


LONG = tuple(range(2000, 2000 + 45))  # 5 pages of 8 and a part


def test_prefix_caching_serves_shared_pages_with_the_same_answers(model):
  """A second request sharing a 45-token prefix gets its 5 full pages from the cache (not
  the page holding its last prompt token) and the answer it gets without the cache."""
  on, off = make(model), make(model, prefix_caching=False)
  first, second = Request(LONG + (7,), 8), Request(LONG + (9, 10, 11), 8)
  on.run([first])
  tickets = []
  results = {}
  for engine in (on, off):
    got = []
    tickets.append(engine.submit(second, got.append))
    while engine.step():
      pass
    results[engine] = [e.token for e in got]
  assert tickets[0].cached_tokens == 40 and tickets[1].cached_tokens == 0
  assert results[on] == results[off]
  assert on.scheduler.pool.hit_tokens == 40
  # the whole prompt cached but its last page: only 3 tokens are computed again
  again = []
  third = on.submit(Request(LONG + (9, 10, 11), 8), again.append)
  while on.step():
    pass
  assert third.cached_tokens == 40 and [e.token for e in again] == results[on]


def test_a_small_pool_preempts_and_every_answer_stays_exact(model):
  """A pool of 10 pages (80 tokens, less than 3 × 64) serves a near-max_len prompt beside
  short ones; growing sequences preempt the latest admitted, which are recomputed."""
  requests = [Request(tuple(range(100, 160)), 4), Request(PROMPTS[1], 20),
              Request(PROMPTS[2], 20), Request(PROMPTS[3], 20)]
  alone = [make(model, max_batch=1).run([r])[0] for r in requests]
  small = make(model, cache_tokens=80)
  assert small.run(requests) == alone
  assert small.scheduler.preemptions > 0
  small.scheduler.pool.check()
  assert small.scheduler.pool.used_pages == 0


def test_a_long_prompt_is_prefilled_over_steps_while_streams_decode(model):
  """Budget 16: a 60-token prompt takes four steps; the two running streams get a token in
  every one of them, and all answers equal each alone."""
  engine = make(model, max_num_batched_tokens=16)
  streams = [Request(PROMPTS[1], 12), Request(PROMPTS[3], 12)]
  events = [[], [], []]
  for i, r in enumerate(streams):
    engine.submit(r, events[i].append)
  engine.step()  # both prompts (7 + 3 tokens) in the first step's budget
  engine.submit(Request(tuple(range(100, 160)), 3), events[2].append)
  tokens_before = [len(e) for e in events[:2]]
  steps = 0
  while not events[2]:
    engine.step()
    steps += 1
  assert steps >= 4
  assert [len(e) - n for e, n in zip(events[:2], tokens_before)] == [steps, steps]
  while engine.step():
    pass
  alone = [make(model).run([r])[0][0] for r in streams]
  assert [[e.token for e in got] for got in events[:2]] == alone


def test_a_failing_prefill_fails_only_its_request(model, monkeypatch):
  engine = make(model)
  extend = engine.paged.extend

  def fails_for_long(pool, tokens, *args, **kwargs):
    if len(tokens) > 25:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return extend(pool, tokens, *args, **kwargs)

  monkeypatch.setattr(engine.paged, "extend", fails_for_long)
  got = [[], []]
  engine.submit(Request(PROMPTS[0], 5), got[0].append)
  engine.submit(Request(PROMPTS[1], 5), got[1].append)
  while engine.step():
    pass
  assert got[0][-1].finish_reason == "error" and "RESOURCE_EXHAUSTED" in got[0][-1].error
  assert len(got[1]) == 5 and engine.failure is None and engine.active == 0


def test_a_request_that_can_never_fit_the_pool_is_refused(model):
  engine = make(model, cache_tokens=32)
  with pytest.raises(RequestError, match="pool holds 32"):
    engine.submit(Request(PROMPTS[0], 8), lambda e: None)
