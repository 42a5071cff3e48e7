"""`serve.py`'s agent loop: 8 conversations share a ~2K-token system prompt and grow by a
scripted tool call and its result each turn, through the server, prefix caching on against
off (see serve.py's docstring). The clients run in a process of their own
(agent_client.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

import agent_client  # benchmarks/, beside this: the load generator

from smallfour.inference.engine import Engine
from smallfour.serve.server import Server

_CONVERSATIONS = flags.DEFINE_integer("agent_conversations", 8, "Conversations at once.")
_TURNS = flags.DEFINE_integer("agent_turns", 8, "Requests per conversation.")
_SYSTEM_TOKENS = flags.DEFINE_integer("system_tokens", 1800,
                                      "The shared system prompt's runbook text.")
_TOOL_TOKENS = flags.DEFINE_integer("tool_tokens", 220, "Each tool result.")
_AGENT_MAX_TOKENS = flags.DEFINE_integer("agent_max_tokens", 32, "Completion tokens per turn.")
_AGENT_REPEATS = flags.DEFINE_integer("agent_repeats", 1, "Measured rounds per side.")


def _round(port: int, seed: int, tokens_per_word: float) -> dict:
  """One round against the server on `port`, by agent_client.py in a process of its own."""
  settings = {"port": port, "seed": seed, "tokens_per_word": tokens_per_word,
              "conversations": _CONVERSATIONS.value, "turns": _TURNS.value,
              "system_tokens": _SYSTEM_TOKENS.value, "tool_tokens": _TOOL_TOKENS.value,
              "max_tokens": _AGENT_MAX_TOKENS.value}
  client = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent_client.py")
  done = subprocess.run([sys.executable, client, json.dumps(settings)], capture_output=True,
                        text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"agent_client.py failed: {done.stderr.strip()[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def agent(engines: dict[str, Engine], tok, compiles) -> dict:
  """engines: "prefix_caching" and "no_prefix_caching" (compiled); compiles: serve.py's
  XLA compile counter, to report any compile inside a measured loop."""
  rate = agent_client.tokens_per_word(
      lambda s: tok.mistral.instruct_tokenizer.tokenizer.encode(s, bos=False, eos=False))
  n = _CONVERSATIONS.value
  servers = {name: Server(e, tok, "bench", port=0, log_level="warning")
             for name, e in engines.items()}
  ports = {name: server.start() for name, server in servers.items()}
  out, compiled = {}, {name: {"compiles": 0, "seconds": 0.0} for name in servers}
  pooled = {name: [] for name in servers}  # every round's TTFTs at turns >= 2
  try:
    for repeat in range(_AGENT_REPEATS.value):  # alternately; the fastest loop per side
      for name in servers:
        mark = compiles.mark
        got = _round(ports[name], repeat, rate)
        c = compiles.since(mark)
        compiled[name] = {k: compiled[name][k] + c[k] for k in c}
        pooled[name] += got.pop("ttft_s_turns_2_on")
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
  every = {name: agent_client.ms(ttfts) if ttfts else None for name, ttfts in pooled.items()}
  every_ratio = None
  if every["prefix_caching"]:
    every_ratio = every["no_prefix_caching"][0] / every["prefix_caching"][0]
    print(f"every round's requests at turns ≥ 2 ({_AGENT_REPEATS.value} rounds per side), TTFT "
          f"ms p50 / p99: {' / '.join(map(str, every['prefix_caching']))} with caching, "
          f"{' / '.join(map(str, every['no_prefix_caching']))} without: {every_ratio:.1f}×")
  print(f"tokens/s: {on['tokens_per_s']} with caching, {off['tokens_per_s']} without; loop "
        f"wall {on['seconds']} s / {off['seconds']} s")
  return {"conversations": n, "turns": _TURNS.value, "system_tokens": _SYSTEM_TOKENS.value,
          "tool_tokens": _TOOL_TOKENS.value, "max_tokens": _AGENT_MAX_TOKENS.value,
          "compiled_while_measured": compiled, "prefix_caching": on,
          "no_prefix_caching": off,
          "ttft_p50_ratio_turns_2_on": ratio,
          "every_round_ttft_ms_p50_p99_turns_2_on": every,
          "every_round_ttft_p50_ratio_turns_2_on": every_ratio}
