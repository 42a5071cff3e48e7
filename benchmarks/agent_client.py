"""The agent loop's load generator, in a process of its own (`serve_agent.py` starts it):
a client sharing the server's interpreter would take the GIL from the server for every
chunk it parses (~280 a second with prefix caching) and charge that to the server's TTFT.

    python benchmarks/agent_client.py '{"port": 8000, "seed": 0, "conversations": 8, ...}'

prints one JSON object: the round's wall time, completion tokens and per-turn TTFT, prompt
and cached tokens. No JAX here: it starts in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Callable

import numpy as np
import openai

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


def lines(rng: random.Random, words: int) -> str:
  """Seeded log lines of about `words` words."""
  out, n = [], 0
  while n < words:
    k = rng.randint(6, 14)
    out.append(f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} "
               f"{rng.choice(SERVICES)}-{rng.randint(1, 9)} {rng.choice(LEVELS)} "
               + " ".join(rng.choice(WORDS) for _ in range(k)))
    n += k + 3
  return "\n".join(out)


def tokens_per_word(encode: Callable[[str], list[int]]) -> float:
  """The tokenizer's tokens per word of `lines` (the parent calibrates, the child uses)."""
  sample = lines(random.Random(0), 400)
  return len(encode(sample)) / len(sample.split())


class Workload:
  """The conversations of one round, from the loop's settings (see serve_agent.py)."""

  def __init__(self, settings: dict):
    self.s = settings

  def about(self, rng: random.Random, tokens: int) -> str:
    return lines(rng, int(tokens / self.s["tokens_per_word"]))

  def starts(self) -> tuple[str, list[str]]:
    rng = random.Random(self.s["seed"])
    system = ("You are the on-call operations agent for a fleet of services. Use search_logs "
              "to investigate; answer with the cause and the fix. Runbook and recent incident "
              "notes follow.\n" + self.about(rng, self.s["system_tokens"]))
    tasks = [f"Incident {self.s['seed']}-{i}: {rng.choice(SERVICES)} reports "
             f"{rng.choice(WORDS)} {rng.choice(WORDS)} since {rng.randint(0, 23):02d}:00. "
             "Find the cause." for i in range(self.s["conversations"])]
    return system, tasks

  def tool_turn(self, rng: random.Random) -> list[dict]:
    call_id = "".join(rng.choice("abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")
                      for _ in range(9))
    args = {"query": f"{rng.choice(WORDS)} {rng.choice(WORDS)}",
            "service": rng.choice(SERVICES)}
    return [{"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "search_logs", "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": call_id,
             "content": self.about(rng, self.s["tool_tokens"])}]


async def run_round(settings: dict) -> dict:
  """Every conversation at once, each turn after the previous answer; per-turn records."""
  work = Workload(settings)
  client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{settings['port']}/v1",
                              api_key="unused", max_retries=0, timeout=1800)
  system, tasks = work.starts()
  turns = [[] for _ in range(settings["turns"])]

  async def conversation(i: int):
    rng = random.Random(settings["seed"] * 1000 + i)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": tasks[i]}]
    for t in range(settings["turns"]):
      if t:
        messages += work.tool_turn(rng)
      sent, first, usage = time.perf_counter(), None, None
      stream = await client.chat.completions.create(
          model="bench", messages=messages, tools=TOOLS, max_tokens=settings["max_tokens"],
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
  await asyncio.gather(*(conversation(i) for i in range(settings["conversations"])))
  seconds = time.perf_counter() - start
  await client.close()
  completion = sum(r["completion"] for turn in turns for r in turn)
  per_turn = [{"ttft_ms_p50_p99": ms([r["ttft"] for r in turn]),
               "prompt_tokens": round(float(np.mean([r["prompt"] for r in turn]))),
               "cached_tokens": round(float(np.mean([r["cached"] for r in turn])))}
              for turn in turns]
  later = [r["ttft"] for turn in turns[1:] for r in turn]
  return {"seconds": round(seconds, 1), "completion_tokens": completion,
          "tokens_per_s": round(completion / seconds, 1), "turns": per_turn,
          "ttft_ms_p50_p99_turns_2_on": ms(later) if later else None,
          "ttft_s_turns_2_on": [round(t, 4) for t in later]}


def ms(seconds: list[float]) -> list[float]:
  """p50 and p99 in ms."""
  return [round(float(np.percentile(seconds, q)) * 1e3, 1) for q in (50, 99)]


if __name__ == "__main__":
  print(json.dumps(asyncio.run(run_round(json.loads(sys.argv[1])))))
