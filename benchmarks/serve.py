"""Serving under load: the OpenAI server at concurrency 1, 4 and 16, next to the same engine
generating the same requests offline, in one run.

  python benchmarks/serve.py --json=serve.json

One process: the model, one `Batcher` (max_batch slots), and the server on it in a thread
on a free localhost port. At each concurrency c, c clients (the official `openai` async
client, streaming) each send --rounds requests one after another: fixed chat prompts, greedy,
--max_tokens each. Measured per level:
  * aggregate tokens/s: completion tokens (the usage chunks) / wall time of the level;
  * time to first token (TTFT): from sending the request to the first chunk that carries
    text; inter-token latency (ITL): the gaps between such chunks (p50 / p90 / p99);
  * offline: the same requests, c at a time, submitted to the Batcher and stepped
    in this thread (no HTTP, no event loop), timed from each request's events.
Everything is compiled first (every request once, offline); each level
runs offline and online in turn, --repeats times, and keeps each side's fastest run. The
load is bounded by --rounds. The clients share the process (and the 2 cores here) with the
server: that costs the online side some throughput, shown as the online/offline ratio.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import openai
from absl import app, flags

from smallfour import loading
from smallfour.inference.batcher import Batcher, Request
from smallfour.serve import protocol
from smallfour.serve.server import Server

_CKPT = flags.DEFINE_string("ckpt", None, "A converted checkpoint (default: --config).")
_CONFIG = flags.DEFINE_string("config", "tiny", "A preset when no --ckpt.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tekken.json (overrides the default).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Slots.")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "Tokens per slot.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4", "16"], "Concurrent clients.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Requests each client sends, one after another.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Completion tokens per request.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per level, offline and online in turn.")
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


def _offline(batcher: Batcher, prompts: list[tuple[int, ...]], c: int) -> dict:
  """The same requests, c at a time (each client's r-th request together), stepped here."""
  ttft, itl, tokens, seconds = [], [], 0, 0.0
  for r in range(_ROUNDS.value):
    times = {}

    def sink(i):
      return lambda event: times.setdefault(i, []).append(time.perf_counter())

    start = time.perf_counter()
    for w in range(c):
      i = w + r * c
      batcher.submit(Request(prompts[i], _MAX_TOKENS.value), sink(i))
    while batcher.step():
      pass
    seconds += time.perf_counter() - start
    for got in times.values():
      tokens += len(got)
      ttft.append(got[0] - start)
      itl.extend(np.diff(got))
  return _summary(tokens, seconds, ttft, itl)


def _best(a: dict | None, b: dict) -> dict:
  return b if a is None or b["tokens_per_s"] > a["tokens_per_s"] else a


def _summary(tokens: int, seconds: float, ttft: list[float], itl: list[float]) -> dict:
  ms = lambda xs: [round(float(np.percentile(xs, q)) * 1e3, 1) for q in (50, 90, 99)]  # noqa
  return {"tokens": tokens, "seconds": round(seconds, 3),
          "tokens_per_s": round(tokens / seconds, 1), "ttft_ms_p50_p90_p99": ms(ttft),
          "itl_ms_p50_p90_p99": ms(itl)}


def main(argv):
  del argv
  levels = [int(c) for c in _CONCURRENCY.value]
  try:
    cfg = loading.config(ckpt=_CKPT.value, config=None if _CKPT.value else _CONFIG.value)
    tok = loading.tokenizer(cfg, ckpt=_CKPT.value, config=_CONFIG.value, path=_TOKENIZER.value)
    model, mesh = loading.model(cfg, ckpt=_CKPT.value)
  except loading.LoadError as e:
    raise SystemExit(f"error: {e}") from None
  batcher = Batcher(model, max_batch=_MAX_BATCH.value, max_len=_MAX_LEN.value,
                    eos_id=tok.eos_id, mesh=mesh)
  n = max(levels) * _ROUNDS.value
  prompts = [tuple(tok.encode(protocol.split(_ask(i))[0])) for i in range(n)]
  start = time.perf_counter()
  for i in range(0, n, _MAX_BATCH.value):  # compiles every prompt bucket and window used
    batcher.generate([Request(p, _MAX_TOKENS.value) for p in prompts[i:i + _MAX_BATCH.value]])
  compile_s = time.perf_counter() - start
  offline, online = {}, {}
  for c in levels:  # alternately, best of --repeats: this machine's speed drifts
    for _ in range(_REPEATS.value):
      offline[c] = _best(offline.get(c), _offline(batcher, prompts, c))
      server = Server(batcher, tok, "bench", port=0, log_level="warning")
      port = server.start()
      try:
        online[c] = _best(online.get(c), asyncio.run(_online(port, c)))
      finally:
        server.stop()
  results = {"max_batch": _MAX_BATCH.value, "max_len": _MAX_LEN.value,
             "max_tokens": _MAX_TOKENS.value, "rounds": _ROUNDS.value,
             "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
             "repeats": _REPEATS.value, "compile_s": round(compile_s, 1), "online": online,
             "offline": offline}
  print(f"max_batch {_MAX_BATCH.value}, {_MAX_TOKENS.value} tokens per request, prompts of "
        f"{results['prompt_tokens'][0]}-{results['prompt_tokens'][1]} tokens, "
        f"{_ROUNDS.value} rounds; compiled in {compile_s:.1f} s")
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
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
