"""Serving under load on the paged Engine: three workloads, each side by side in one run.

  python benchmarks/serve.py --json=serve.json                        # all three
  python benchmarks/serve.py --workloads=agent,long_prompt            # some

One process, the tiny preset by default. Every engine has --max_batch slots of --max_len
tokens and one pool of --cache_tokens (default max_batch × max_len), so all of them run
the same compiled programs: the first is compiled whole (`Engine.warmup`: every decode
window and prompt-chunk shape; jax's persistent cache, --compile_cache, serves later runs)
and the others share its `PagedModel`, each with a pool of its own. Compile seconds are
reported apart, and so is any compile that still falls inside a measured part.

concurrency: the OpenAI server at concurrency 1, 4 and 16 on one Engine, next to the same
  engine generating the same requests offline. At each concurrency c, c clients (the
  official `openai` async client, streaming) each send --rounds requests one after another:
  fixed chat prompts, greedy, --max_tokens each. Measured per level: aggregate tokens/s
  (completion tokens from the usage chunks / wall time), time to first token (TTFT: sending
  to the first chunk carrying text) and inter-token latency (ITL: gaps between such chunks),
  p50 / p90 / p99; offline, the same requests c at a time submitted to the Engine and
  stepped in this thread (no HTTP, no event loop), timed from each request's events. Each
  level runs offline and online in turn, --repeats times, and keeps each side's fastest run.

agent: an agent loop through the server, prefix caching on against off (two Engines, two
  Servers, the same requests). --agent_conversations conversations at once share a system
  prompt (about --system_tokens tokens of operations runbook and one `search_logs` tool:
  about 2K tokens with the first question); each runs --agent_turns turns one after another:
  turn 1 asks, and every later turn appends an assistant message calling `search_logs` and a
  `tool` message answering it with about --tool_tokens tokens of log lines, as the chat
  format takes them. The tool calls in the history are scripted (the preset's random weights
  call no tools); the answer generated each turn (greedy, --agent_max_tokens) is read and
  dropped. So each turn's prompt extends the previous one and the prefix cache can serve all
  of it but the new messages (and a partly filled last page). Measured per turn: TTFT p50 /
  p99 over the conversations (sending to the first chunk with any delta or a finish), the
  prompt and cached tokens (the usage's `prompt_tokens_details.cached_tokens`), and over the
  loop the completion tokens/s. Each round has content of its own (--agent_repeats rounds
  per side, alternately, the fastest loop kept; TTFT over every round's requests is reported
  too, a steadier estimate), so no round reuses another's pages.

long_prompt: a --long_tokens prompt arriving while --long_streams streams decode, at the
  Engine (its thread, as the server runs it; tokens timed at each request's sink). First
  the long prompt's prefill time alone (first token of a fresh long prompt on the idle
  engine, best of 2); then --long_streams streams of --stream_tokens tokens start, and
  once each has given 16 tokens a fresh long prompt is submitted. Reported: the streams'
  largest inter-token gap while it is prefilled (and their largest and median gaps
  before it came), its own time to first token under that load, and gap ÷ prefill alone:
  with prompt chunks of at most --max_num_batched_tokens tokens per step the streams
  wait for one chunk at a time, not for the whole prefill.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import jax
import numpy as np
import openai
from absl import app, flags

from smallfour import loading
from smallfour.inference.engine import Engine
from smallfour.inference.requests import Event, Request
from smallfour.serve import protocol
from smallfour.serve.server import Server

import serve_agent  # benchmarks/, beside this: the agent loop and its flags

_CKPT = flags.DEFINE_string("ckpt", None, "A converted checkpoint (default: --config).")
_CONFIG = flags.DEFINE_string("config", "tiny", "A preset when no --ckpt.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tekken.json (overrides the default).")
_WORKLOADS = flags.DEFINE_list("workloads", ["concurrency", "agent", "long_prompt"],
                               "Which workloads to run.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Slots of every engine.")
_MAX_LEN = flags.DEFINE_integer("max_len", 4096, "Tokens per sequence.")
_ENGINE = loading.define_engine_flags()
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", "/tmp/smallfour_jax_cache",
                                     "jax's persistent compilation cache ('' for none).")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4", "16"], "Concurrent clients.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Requests each client sends, one after another.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Completion tokens per request.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per level, offline and online in turn.")
_LONG_TOKENS = flags.DEFINE_integer("long_tokens", 3584, "The long prompt.")
_LONG_STREAMS = flags.DEFINE_integer("long_streams", 8, "Streams decoding meanwhile.")
_STREAM_TOKENS = flags.DEFINE_integer("stream_tokens", 256, "Tokens each stream asks for.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")

QUESTIONS = [
    "Name the capital of France.", "What is 17 * 23?", "Write a haiku about rain.",
    "List three primary colours.", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Give me a synonym for 'fast'.", "What is a prime number?",
    "Summarise the plot of Hamlet.", "How many legs does a spider have?",
    "Suggest a name for a cat.", "What is the boiling point of water?",
    "Explain recursion briefly.", "Who wrote 'Pride and Prejudice'?",
    "What does CPU stand for?", "Recommend a book about space.",
]


def _ms(xs) -> list[float]:
  return [round(float(np.percentile(xs, q)) * 1e3, 1) for q in (50, 90, 99)]


def _summary(tokens: int, seconds: float, ttft: list[float], itl: list[float]) -> dict:
  return {"tokens": tokens, "seconds": round(seconds, 3),
          "tokens_per_s": round(tokens / seconds, 1), "ttft_ms_p50_p90_p99": _ms(ttft),
          "itl_ms_p50_p90_p99": _ms(itl)}


def _best(a: dict | None, b: dict) -> dict:
  return b if a is None or b["tokens_per_s"] > a["tokens_per_s"] else a


class _Compiles:
  """Counts XLA compiles (jax.monitoring), to report any inside a measured part."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1
      self.seconds += seconds

  def since(self, mark: tuple[int, float]) -> dict:
    return {"compiles": self.count - mark[0], "seconds": round(self.seconds - mark[1], 1)}

  @property
  def mark(self) -> tuple[int, float]:
    return self.count, self.seconds


COMPILES: _Compiles | None = None


def _engines(model, mesh, tok, common: dict, caching: tuple[bool, ...]) -> list[Engine]:
  """One Engine per prefix-caching setting, all running the first one's compiled programs
  (the same model, page size and pool shape; each keeps its own pool and scheduler)."""
  engines = [Engine(model, prefix_caching=c, eos_id=tok.eos_id, mesh=mesh, **common)
             for c in caching]
  for engine in engines[1:]:
    engine.paged = engines[0].paged
  return engines


# ------------------------------------------------------------------ concurrency

def _ask(i: int) -> dict:
  return {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
          "max_tokens": _MAX_TOKENS.value}


async def _online(port: int, c: int) -> dict:
  client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                              max_retries=0, timeout=600)
  ttft, itl, tokens = [], [], 0

  async def one(i: int):
    nonlocal tokens
    sent, times = time.perf_counter(), []
    stream = await client.chat.completions.create(
        model="bench", stream=True, stream_options={"include_usage": True}, **_ask(i))
    async for chunk in stream:
      if chunk.usage is not None:
        tokens += chunk.usage.completion_tokens
      if chunk.choices and (chunk.choices[0].delta.content
                            or getattr(chunk.choices[0].delta, "reasoning_content", None)):
        times.append(time.perf_counter())
    ttft.append(times[0] - sent)
    itl.extend(np.diff(times))

  async def worker(w: int):
    for r in range(_ROUNDS.value):
      await one(w + r * c)

  start = time.perf_counter()
  await asyncio.gather(*(worker(w) for w in range(c)))
  seconds = time.perf_counter() - start
  await client.close()
  return _summary(tokens, seconds, ttft, itl)


def _offline(engine: Engine, prompts: list[tuple[int, ...]], c: int) -> dict:
  """The same requests, c at a time (each client's r-th request together), stepped here."""
  ttft, itl, tokens, seconds = [], [], 0, 0.0
  for r in range(_ROUNDS.value):
    times = {}

    def sink(i):
      return lambda event: event.token is not None and times.setdefault(i, []).append(
          time.perf_counter())

    start = time.perf_counter()
    for w in range(c):
      i = w + r * c
      engine.submit(Request(prompts[i], _MAX_TOKENS.value), sink(i))
    while engine.step():
      pass
    seconds += time.perf_counter() - start
    for got in times.values():
      tokens += len(got)
      ttft.append(got[0] - start)
      itl.extend(np.diff(got))
  return _summary(tokens, seconds, ttft, itl)


def concurrency(engine: Engine, tok) -> dict:
  levels = [int(c) for c in _CONCURRENCY.value]
  n = max(levels) * _ROUNDS.value
  prompts = [tuple(tok.encode(protocol.split(_ask(i))[0])) for i in range(n)]
  for i in range(0, n, engine.max_batch):  # the prefix cache's hits, as later runs meet them
    engine.run([Request(p, _MAX_TOKENS.value) for p in prompts[i:i + engine.max_batch]])
  offline, online = {}, {}
  mark = COMPILES.mark
  for c in levels:  # alternately, best of --repeats: this machine's speed drifts
    for _ in range(_REPEATS.value):
      offline[c] = _best(offline.get(c), _offline(engine, prompts, c))
      server = Server(engine, tok, "bench", port=0, log_level="warning")
      port = server.start()
      try:
        online[c] = _best(online.get(c), asyncio.run(_online(port, c)))
      finally:
        server.stop()
  compiled = COMPILES.since(mark)
  print(f"\nconcurrency: {engine.max_batch} slots, {_MAX_TOKENS.value} tokens per request, "
        f"prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{_ROUNDS.value} rounds, best of {_REPEATS.value}; compiles while measured: "
        f"{compiled}")
  print("| concurrency | online tok/s | × c=1 | offline tok/s | online/offline | "
        "TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 |")
  print("|---|---|---|---|---|---|---|")
  one = online[levels[0]]["tokens_per_s"]
  for c in levels:
    on, off = online[c], offline[c]
    print(f"| {c} | {on['tokens_per_s']} | {on['tokens_per_s'] / one:.1f}× | "
          f"{off['tokens_per_s']} | {on['tokens_per_s'] / off['tokens_per_s']:.2f} | "
          f"{' / '.join(map(str, on['ttft_ms_p50_p90_p99']))} | "
          f"{' / '.join(map(str, on['itl_ms_p50_p90_p99']))} |")
  return {"max_tokens": _MAX_TOKENS.value, "rounds": _ROUNDS.value,
          "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
          "repeats": _REPEATS.value, "online": online, "offline": offline,
          "compiled_while_measured": compiled}


# ------------------------------------------------------------------ long prompt

class _Recorder:
  """A request's sink: the time of each token, and when it finished."""

  def __init__(self):
    self.times: list[float] = []
    self.done = threading.Event()

  def __call__(self, event: Event) -> None:
    if event.token is not None:
      self.times.append(time.perf_counter())
    if event.finish_reason is not None:
      self.done.set()


def long_prompt(engine: Engine) -> dict:
  mark = COMPILES.mark
  out = _long_prompt_once(engine)
  out["compiled_while_measured"] = COMPILES.since(mark)
  print(f"\nlong prompt: {_LONG_TOKENS.value} tokens arriving while {out['streams']} streams "
        f"decode (at most {engine.scheduler.max_tokens} tokens per step); compiles while "
        f"measured: {out['compiled_while_measured']}")
  print("| prefill alone s | its TTFT with the streams s | streams' largest gap during it s "
        "| largest / median gap before s | largest gap ÷ prefill alone |")
  print("|---|---|---|---|---|")
  print(f"| {out['prefill_alone_s']} | {out['long_ttft_with_streams_s']} | "
        f"{out['max_gap_during_s']} | {out['max_gap_before_s']} / "
        f"{out['median_gap_before_s']} | {out['max_gap_over_prefill']} |")
  return out


def _long_prompt_once(engine: Engine) -> dict:
  rng = np.random.default_rng(0)
  fresh = lambda n: tuple(int(t) for t in rng.integers(1000, engine.cfg.vocab_size, n))  # noqa
  engine.start()
  try:
    alone = []
    for _ in range(2):
      r, sent = _Recorder(), time.perf_counter()
      engine.submit(Request(fresh(_LONG_TOKENS.value), 1), r)
      r.done.wait()
      alone.append(r.times[0] - sent)
    streams = [_Recorder() for _ in range(_LONG_STREAMS.value)]
    for s in streams:
      engine.submit(Request(fresh(24), _STREAM_TOKENS.value), s)
    while not all(len(s.times) >= 16 or s.done.is_set() for s in streams):
      time.sleep(0.005)
    long, sent = _Recorder(), time.perf_counter()
    engine.submit(Request(fresh(_LONG_TOKENS.value), 1), long)
    long.done.wait()
    for s in streams:
      s.done.wait()
  finally:
    engine.stop()
  first = long.times[0]
  during, before = [], []
  for s in streams:
    for a, b in zip(s.times, s.times[1:]):
      if b > sent and a < first:
        during.append(b - a)
      elif b <= sent:
        before.append(b - a)
  out = {"long_tokens": _LONG_TOKENS.value, "streams": len(streams),
         "stream_tokens": [len(s.times) for s in streams],
         "prefill_alone_s": round(min(alone), 3),
         "long_ttft_with_streams_s": round(first - sent, 3),
         "max_gap_during_s": round(max(during), 3) if during else None,
         "max_gap_before_s": round(max(before), 3), "median_gap_before_s":
         round(float(np.median(before)), 4)}
  out["max_gap_over_prefill"] = (round(out["max_gap_during_s"] / out["prefill_alone_s"], 3)
                                 if during else None)
  return out


def main(argv):
  del argv
  if _COMPILE_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  load = os.getloadavg()[0]
  try:
    cfg = loading.config(ckpt=_CKPT.value, config=None if _CKPT.value else _CONFIG.value)
    tok = loading.tokenizer(cfg, ckpt=_CKPT.value, config=_CONFIG.value, path=_TOKENIZER.value)
    model, mesh = loading.model(cfg, ckpt=_CKPT.value)
  except loading.LoadError as e:
    raise SystemExit(f"error: {e}") from None
  global COMPILES
  COMPILES = _Compiles()
  flags_ = _ENGINE.values()
  common = {"max_len": _MAX_LEN.value, "max_batch": _MAX_BATCH.value,
            "page_size": flags_["page_size"], "max_num_batched_tokens":
            flags_["max_num_batched_tokens"], "cache_tokens": flags_["cache_tokens"]
            or _MAX_BATCH.value * _MAX_LEN.value}
  results = {"config": _CKPT.value or _CONFIG.value, **common,
             "prefix_caching": flags_["prefix_caching"]}
  print(f"{_MAX_BATCH.value} slots of {_MAX_LEN.value} tokens, pages of "
        f"{common['page_size']}, pool {common['cache_tokens']} tokens, at most "
        f"{common['max_num_batched_tokens']} tokens per step; load average {load:.1f}")
  settings = [flags_["prefix_caching"]]
  if "agent" in _WORKLOADS.value:
    settings += [not flags_["prefix_caching"]]
  engines = dict(zip(settings, _engines(model, mesh, tok, common, tuple(settings))))
  start = time.perf_counter()
  engines[settings[0]].warmup()
  results["compile_s"] = round(time.perf_counter() - start, 1)
  print(f"compiled in {results['compile_s']} s ({COMPILES.count} compiles, "
        f"{COMPILES.seconds:.0f} s of them in XLA)", flush=True)
  if "concurrency" in _WORKLOADS.value:
    results["concurrency"] = concurrency(engines[settings[0]], tok)
  if "long_prompt" in _WORKLOADS.value:
    results["long_prompt"] = long_prompt(engines[settings[0]])
  if "agent" in _WORKLOADS.value:
    results["agent"] = serve_agent.agent({"prefix_caching": engines[True],
                                          "no_prefix_caching": engines[False]}, tok, COMPILES)
  results["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]
  print(f"\nload average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
