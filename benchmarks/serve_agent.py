"""`serve.py`'s agent loop: 8 conversations share a ~2K-token system prompt and grow by a
scripted tool call and its result each turn, through the server, prefix caching on against
off (see serve.py's docstring)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import numpy as np
import openai
from absl import flags

from smallfour.inference.engine import Engine
from smallfour.serve.server import Server

_CONVERSATIONS = flags.DEFINE_integer("agent_conversations", 8, "Conversations at once.")
_TURNS = flags.DEFINE_integer("agent_turns", 8, "Requests per conversation.")
_SYSTEM_TOKENS = flags.DEFINE_integer("system_tokens", 1800,
                                      "The shared system prompt's runbook text.")
_TOOL_TOKENS = flags.DEFINE_integer("tool_tokens", 220, "Each tool result.")
_AGENT_MAX_TOKENS = flags.DEFINE_integer("agent_max_tokens", 32, "Completion tokens per turn.")
_AGENT_REPEATS = flags.DEFINE_integer("agent_repeats", 1, "Measured rounds per side.")

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


def agent(engines: dict[str, Engine], tok, compiles) -> dict:
  """engines: "prefix_caching" and "no_prefix_caching" (compiled); compiles: serve.py's
  XLA compile counter, to report any compile inside a measured loop."""
  text = _Text(tok)
  n = _CONVERSATIONS.value
  servers = {name: Server(e, tok, "bench", port=0, log_level="warning")
             for name, e in engines.items()}
  ports = {name: server.start() for name, server in servers.items()}
  out, compiled = {}, {name: {"compiles": 0, "seconds": 0.0} for name in servers}
  try:
    for repeat in range(_AGENT_REPEATS.value):  # alternately; the fastest loop per side
      for name in servers:
        mark = compiles.mark
        got = asyncio.run(_agent_round(ports[name], text, repeat, n))
        c = compiles.since(mark)
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
