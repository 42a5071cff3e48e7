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
  per side, alternately, the fastest loop kept), so no round reuses another's pages.

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
import random
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
_CONVERSATIONS = flags.DEFINE_integer("agent_conversations", 8, "Conversations at once.")
_TURNS = flags.DEFINE_integer("agent_turns", 8, "Requests per conversation.")
_SYSTEM_TOKENS = flags.DEFINE_integer("system_tokens", 1800,
                                      "The shared system prompt's runbook text.")
_TOOL_TOKENS = flags.DEFINE_integer("tool_tokens", 220, "Each tool result.")
_AGENT_MAX_TOKENS = flags.DEFINE_integer("agent_max_tokens", 32, "Completion tokens per turn.")
_AGENT_REPEATS = flags.DEFINE_integer("agent_repeats", 1, "Measured rounds per side.")
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
TOOLS = [{"type": "function", "function": {
    "name": "search_logs", "description": "Search the service logs; returns matching lines.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "Words to look for."},
        "service": {"type": "string", "description": "The service whose logs to search."}},
        "required": ["query"]}}}]
SERVICES = ["checkout", "search", "auth", "billing", "inventory", "gateway", "mailer", "feeds"]
WORDS = ("request latency error timeout retry cache page token worker queue shard replica "
         "node disk memory upstream downstream deploy rollback threshold alert pager quota "
         "connection pool socket handshake certificate region zone leader follower lease "
         "heartbeat backlog throughput saturation eviction compaction snapshot").split()
LEVELS = ["INFO", "WARN", "ERROR", "DEBUG"]


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


# ------------------------------------------------------------------ agent loop

class _Text:
  """Seeded filler text of about n tokens (calibrated against the tokenizer once)."""

  def __init__(self, tok):
    self._encode = lambda s: tok.mistral.instruct_tokenizer.tokenizer.encode(  # noqa: E731
        s, bos=False, eos=False)
    sample = self.lines(random.Random(0), 400)
    self.tokens_per_word = len(self._encode(sample)) / len(sample.split())

  @staticmethod
  def lines(rng: random.Random, words: int) -> str:
    out, n = [], 0
    while n < words:
      k = rng.randint(6, 14)
      out.append(f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} "
                 f"{rng.choice(SERVICES)}-{rng.randint(1, 9)} {rng.choice(LEVELS)} "
                 + " ".join(rng.choice(WORDS) for _ in range(k)))
      n += k + 3
    return "\n".join(out)

  def about(self, rng: random.Random, tokens: int) -> str:
    return self.lines(rng, int(tokens / self.tokens_per_word))


def _conversation_starts(text: _Text, seed: int, n: int) -> tuple[str, list[str]]:
  rng = random.Random(seed)
  system = ("You are the on-call operations agent for a fleet of services. Use search_logs "
            "to investigate; answer with the cause and the fix. Runbook and recent incident "
            "notes follow.\n" + text.about(rng, _SYSTEM_TOKENS.value))
  tasks = [f"Incident {seed}-{i}: {rng.choice(SERVICES)} reports {rng.choice(WORDS)} "
           f"{rng.choice(WORDS)} since {rng.randint(0, 23):02d}:00. Find the cause."
           for i in range(n)]
  return system, tasks


def _tool_turn(text: _Text, rng: random.Random) -> list[dict]:
  call_id = "".join(rng.choice("abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")
                    for _ in range(9))
  args = {"query": f"{rng.choice(WORDS)} {rng.choice(WORDS)}", "service": rng.choice(SERVICES)}
  return [{"role": "assistant", "content": None, "tool_calls": [
              {"id": call_id, "type": "function",
               "function": {"name": "search_logs", "arguments": json.dumps(args)}}]},
          {"role": "tool", "tool_call_id": call_id,
           "content": text.about(rng, _TOOL_TOKENS.value)}]


async def _agent_round(port: int, text: _Text, seed: int, conversations: int) -> dict:
  client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                              max_retries=0, timeout=1800)
  system, tasks = _conversation_starts(text, seed, conversations)
  turns = [[] for _ in range(_TURNS.value)]

  async def conversation(i: int):
    rng = random.Random(seed * 1000 + i)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": tasks[i]}]
    for t in range(_TURNS.value):
      if t:
        messages += _tool_turn(text, rng)
      sent, first, usage = time.perf_counter(), None, None
      stream = await client.chat.completions.create(
          model="bench", messages=messages, tools=TOOLS, max_tokens=_AGENT_MAX_TOKENS.value,
          stream=True, stream_options={"include_usage": True})
      async for chunk in stream:
        if chunk.usage is not None:
          usage = chunk.usage
        if first is None and chunk.choices:
          choice = chunk.choices[0]
          d = choice.delta
          if (d.content or getattr(d, "reasoning_content", None) or d.tool_calls
              or choice.finish_reason):
            first = time.perf_counter()
      details = usage.prompt_tokens_details
      turns[t].append({"ttft": first - sent, "prompt": usage.prompt_tokens,
                       "cached": details.cached_tokens if details else 0,
                       "completion": usage.completion_tokens})

  start = time.perf_counter()
  await asyncio.gather(*(conversation(i) for i in range(conversations)))
  seconds = time.perf_counter() - start
  await client.close()
  completion = sum(r["completion"] for turn in turns for r in turn)
  per_turn = [{"ttft_ms_p50_p99": [round(float(np.percentile([r["ttft"] for r in turn], q))
                                         * 1e3, 1) for q in (50, 99)],
               "prompt_tokens": round(float(np.mean([r["prompt"] for r in turn]))),
               "cached_tokens": round(float(np.mean([r["cached"] for r in turn])))}
              for turn in turns]
  later = [r["ttft"] for turn in turns[1:] for r in turn]
  return {"seconds": round(seconds, 1), "completion_tokens": completion,
          "tokens_per_s": round(completion / seconds, 1), "turns": per_turn,
          "ttft_ms_p50_p99_turns_2_on": [round(float(np.percentile(later, q)) * 1e3, 1)
                                         for q in (50, 99)] if later else None}


def agent(engines: dict[str, Engine], tok) -> dict:
  """engines: "prefix_caching" and "no_prefix_caching" (compiled)."""
  text = _Text(tok)
  n = _CONVERSATIONS.value
  servers = {name: Server(e, tok, "bench", port=0, log_level="warning")
             for name, e in engines.items()}
  ports = {name: server.start() for name, server in servers.items()}
  out, compiled = {}, {name: {"compiles": 0, "seconds": 0.0} for name in servers}
  try:
    for repeat in range(_AGENT_REPEATS.value):  # alternately; the fastest loop per side
      for name in servers:
        mark = COMPILES.mark
        got = asyncio.run(_agent_round(ports[name], text, repeat, n))
        c = COMPILES.since(mark)
        compiled[name] = {k: compiled[name][k] + c[k] for k in c}
        if name not in out or got["seconds"] < out[name]["seconds"]:
          out[name] = got
  finally:
    for server in servers.values():
      server.stop()
  on, off = out["prefix_caching"], out["no_prefix_caching"]
  print(f"\nagent loop: {n} conversations × {_TURNS.value} turns, system prompt + tools "
        f"{on['turns'][0]['prompt_tokens']} tokens, each later turn + a tool call and about "
        f"{_TOOL_TOKENS.value} tokens of tool result, {_AGENT_MAX_TOKENS.value} tokens "
        f"generated per turn; compiles while measured: {compiled}")
  print("| turn | prompt tokens | cached (on) | TTFT ms p50 / p99, caching on | "
        "caching off | p50 off ÷ on |")
  print("|---|---|---|---|---|---|")
  for t, (a, b) in enumerate(zip(on["turns"], off["turns"]), 1):
    print(f"| {t} | {a['prompt_tokens']} | {a['cached_tokens']} | "
          f"{' / '.join(map(str, a['ttft_ms_p50_p99']))} | "
          f"{' / '.join(map(str, b['ttft_ms_p50_p99']))} | "
          f"{b['ttft_ms_p50_p99'][0] / a['ttft_ms_p50_p99'][0]:.1f}× |")
  ratio = None
  if on["ttft_ms_p50_p99_turns_2_on"]:
    ratio = off["ttft_ms_p50_p99_turns_2_on"][0] / on["ttft_ms_p50_p99_turns_2_on"][0]
    print(f"| ≥ 2 | | | {' / '.join(map(str, on['ttft_ms_p50_p99_turns_2_on']))} | "
          f"{' / '.join(map(str, off['ttft_ms_p50_p99_turns_2_on']))} | {ratio:.1f}× |")
  print(f"tokens/s: {on['tokens_per_s']} with caching, {off['tokens_per_s']} without; loop "
        f"wall {on['seconds']} s / {off['seconds']} s")
  return {"conversations": n, "turns": _TURNS.value, "system_tokens": _SYSTEM_TOKENS.value,
          "tool_tokens": _TOOL_TOKENS.value, "max_tokens": _AGENT_MAX_TOKENS.value,
          "compiled_while_measured": compiled, "prefix_caching": on,
          "no_prefix_caching": off,
          "ttft_p50_ratio_turns_2_on": ratio}


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
    results["agent"] = agent({"prefix_caching": engines[True],
                              "no_prefix_caching": engines[False]}, tok)
  results["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]
  print(f"\nload average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
