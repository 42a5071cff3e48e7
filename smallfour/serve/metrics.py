"""`/metrics` in the Prometheus text format (prometheus-client), one registry per app.

Latencies are observed where the tokens reach the HTTP layer (each request's sink, on the
engine thread); the engine's own numbers (slots, queue, pages, token and preemption
counts) are read from it at scrape time, so the engine keeps no metrics library state.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from smallfour.inference.engine import Engine
from smallfour.inference.requests import Event, Sink

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)


class _EngineCollector:
  """The engine's gauges and counters, read when scraped."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def collect(self):
    e = self.engine
    pool = e.scheduler.pool
    gauges = {
        "requests_running": ("Requests holding a slot.", e.active),
        "requests_waiting": ("Requests waiting for a slot or for pages.", e.waiting),
        "cache_pages_used": ("Pages of the latent cache some request holds.", pool.used_pages),
        "cache_pages_total": ("Pages in the latent cache's pool.", pool.num_pages),
    }
    for name, (doc, value) in gauges.items():
      yield GaugeMetricFamily(f"smallfour_{name}", doc, value=value)
    counters = {
        "prefix_cache_hit_tokens": ("Prompt tokens served from the prefix cache.",
                                    pool.hit_tokens),
        "prompt_tokens": ("Prompt tokens of finished prefills.", e.stats["prompt_tokens"]),
        "generation_tokens": ("Tokens generated.", e.stats["generation_tokens"]),
        "preemptions": ("Requests preempted (pages freed, recomputed later).",
                        e.scheduler.preemptions),
    }
    for name, (doc, value) in counters.items():
      yield CounterMetricFamily(f"smallfour_{name}", doc, value=value)


class Metrics:
  """The registry of one app: `timed(sink)` wraps a request's sink to observe its
  latencies; `render()` is the scrape's body."""

  def __init__(self, engine: Engine):
    self.registry = CollectorRegistry()
    self.registry.register(_EngineCollector(engine))
    self.ttft = Histogram("smallfour_time_to_first_token_seconds",
                          "From the request's submission to its first token.",
                          buckets=_LATENCY_BUCKETS, registry=self.registry)
    self.itl = Histogram("smallfour_inter_token_latency_seconds",
                         "Between two tokens of one request.", buckets=_LATENCY_BUCKETS,
                         registry=self.registry)

  def timed(self, sink: Sink) -> Sink:
    last = [time.perf_counter(), True]  # the previous event's time; no token yet

    def on(event: Event) -> None:
      if event.token is not None:
        now = time.perf_counter()
        (self.ttft if last[1] else self.itl).observe(now - last[0])
        last[:] = [now, False]
      sink(event)

    return on

  def render(self) -> bytes:
    return generate_latest(self.registry)
