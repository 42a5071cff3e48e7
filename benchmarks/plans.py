"""The README's table of serving plans for the 119B release (`launch/info.py --plan`).

  python benchmarks/plans.py --out=/tmp/plans          # compile every TPU row (hours)
  python benchmarks/plans.py --out=/tmp/plans --table  # print the table from those files

TPU rows are compiled by XLA:TPU for abstract devices (libtpu, no TPU needed): the paged
decode step and one 512-token prompt chunk, each over the row's page pool (B × T tokens,
whole on every device) and again over half of it (`--probe`, what a cached token costs);
GPU rows are arithmetic from shapes (no GPU compiler here). Each row's JSON is written to
`--out/<name>.json` as soon as it is done, and rows already there are not rerun.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from smallfour import configs, logs
from smallfour.plan import report as plan_lib

_OUT = flags.DEFINE_string("out", "/tmp/plans", "Directory of the rows' JSON files.")
_TABLE = flags.DEFINE_bool("table", False, "Only print the table from --out.")
_ROWS = flags.DEFINE_list("rows", None, "Only these rows (their names below); default all.")
_PROBE = flags.DEFINE_bool("probe", True, "Compile each TPU row's steps over half its pool "
                           "too (measures what a cached token costs; doubles the time).")

K = 1024
# name, target, mesh (None: every device on expert), weights, batch, max_len
ROWS = [
    ("v6e-8 fp8", "v6e:2x4", None, "fp8", 8, 32 * K),
    # The pool the row above says fits (its context_tokens_that_fit, 2026-12-07).
    ("v6e-8 fp8 175K pool", "v6e:2x4", None, "fp8", 8, 32 * K),
    ("v6e-8 bf16", "v6e:2x4", None, "bfloat16", 8, 32 * K),
    ("v5p-8 bf16 B=32", "v5p:2x2x1", None, "bfloat16", 32, 32 * K),
    # B=16 was one sequence's cache per device when the cache was split over the batch; the
    # page pool is whole on every device (16 × 32K tokens: 12 GB beside 12 GB of weights).
    ("v5e-16 fp8", "v5e:4x4", None, "fp8", 16, 32 * K),
    ("tpu7x-8 fp8 256K", "tpu7x:2x2x1", None, "fp8", 8, 256 * K),
    ("1x H200 fp8 256K", "h200", {"data": 1, "expert": 1, "tensor": 1}, "fp8", 1, 256 * K),
    ("2x H200 bf16", "h200", {"data": 1, "expert": 2, "tensor": 1}, "bfloat16", 8, 32 * K),
    ("4x H100 bf16", "h100", {"data": 1, "expert": 4, "tensor": 1}, "bfloat16", 8, 32 * K),
    ("8x H100 bf16", "h100", {"data": 1, "expert": 8, "tensor": 1}, "bfloat16", 8, 32 * K),
    # Integer weights: group 128, attention bf16 (the converter's defaults) unless OPTIONS.
    ("1x H100 int4", "h100", {"data": 1, "expert": 1, "tensor": 1}, "int4", 1, 32 * K),
    ("v5e-8 int4", "v5e:2x4", None, "int4", 8, 32 * K),
    ("v5e-8 int4 8K prompts", "v5e:2x4", None, "int4", 8, 32 * K),
    ("v5e-8 int4 int8-attn 8K prompts", "v5e:2x4", None, "int4", 8, 32 * K),
    ("v5e-8 bf16", "v5e:2x4", None, "bfloat16", 8, 32 * K),
    ("tpu7x-8 int8", "tpu7x:2x2x1", None, "int8", 8, 32 * K),
]
# make_plan arguments of a row beyond its columns (prefill_len default: max_len, the window
# of the last 512-token chunk of the longest prompt).
OPTIONS = {
    "v6e-8 fp8 175K pool": {"cache_tokens": 179536},
    "v5e-8 int4 8K prompts": {"prefill_len": 8 * K},
    "v5e-8 int4 int8-attn 8K prompts": {"prefill_len": 8 * K, "dense_dtype": "int8"},
}


def _gb(x: float | None) -> str:
  return "—" if x is None else f"{x / 1e9:.1f}"


def _seconds(step: dict) -> str:
  """Compile seconds of a step (also when it did not fit: XLA:TPU refused it)."""
  seconds = (step["compiled"] or {}).get("compile_seconds", step.get("compile_seconds"))
  return "—" if seconds is None else f"{seconds:.0f}"


def _tokens(n: int | None) -> str:
  if n is None:
    return "—"
  return f"{n / 2**20:.2f}M" if n >= 2**20 else f"{n / K:.0f}K"


def row(name: str, plan: dict) -> str:
  """One markdown row: fits, headroom, compiled vs counted, accessed ÷ unavoidable,
  ceiling, the pool and the context that fits, compile seconds."""
  decode = plan["decode"]
  counted = decode["counted"]["weights_bytes"] + decode["counted"]["cache_bytes"]
  room = (f"{_gb(plan['headroom_bytes'])} free" if plan["fits"]
          else f"{_gb(plan['missing_bytes'])} short")
  step = decode["compiled"]
  compiled = "—" if step is None else _gb(step["argument_bytes"])
  ratio = decode.get("bytes_accessed_ratio")
  source = "XLA:TPU" if "compiled" in plan["source"] else "arithmetic"
  seconds = (f"{_seconds(decode)} / {_seconds(plan['prefill'])}" if source == "XLA:TPU"
             else "—")
  pool = f"{_tokens(plan['pool']['tokens'])}, {_gb(plan['pool']['bytes'])} GB"
  context = _tokens(plan["context_tokens_that_fit"])
  if source == "XLA:TPU" and plan.get("context_probe_pages") is None:
    context += " (not probed)"  # the pool counted once per token: an upper bound
  return (f"| {name} | `{plan['target']}` {plan['devices']} dev, B={plan['batch']}, "
          f"T={plan['max_len'] // K}K | {'yes' if plan['fits'] else '**no**'} | {room} | "
          f"{compiled} / {_gb(counted)} | {'—' if ratio is None else f'{ratio:.2f}'} | "
          f"{decode['ceiling_tokens_per_s']:,.0f} | {pool} | "
          f"{context} | {seconds} | {source} |")


def _file(name: str) -> str:
  return name.replace(" ", "_").replace("=", "") + ".json"


def main(argv):
  del argv
  logs.library_logs_at_warning()
  os.makedirs(_OUT.value, exist_ok=True)
  cfg = configs.resolve("small4_119b")
  lines = ["| plan | target | fits | headroom (GB/device) | decode args compiled / counted "
           "(GB) | bytes accessed ÷ unavoidable | ceiling tok/s | page pool (tokens, GB on "
           "every device) | context tokens that fit | compile s (decode / prefill) | figures "
           "from |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, target, mesh, weights, batch, max_len in ROWS:
    if _ROWS.value and name not in _ROWS.value:
      continue
    path = os.path.join(_OUT.value, _file(name))
    if not os.path.exists(path):
      if _TABLE.value:
        lines.append(f"| {name} | `{target}` | not compiled yet: `python benchmarks/plans.py "
                     f"--rows='{name}'` | | | | | | | | |")
        continue
      plan = plan_lib.make_plan(cfg, target, mesh=mesh, weights_dtype=weights, batch=batch,
                                max_len=max_len, probe=_PROBE.value, **OPTIONS.get(name, {}))
      with open(path, "w") as f:
        json.dump(plan, f, indent=1)
      print(f"{name}: done", flush=True)
    with open(path) as f:
      lines.append(row(name, json.load(f)))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
