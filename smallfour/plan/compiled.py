"""What XLA says about a lowered program: memory, cost, or how far it is from fitting.

`analyze` compiles a `jax.stages.Lowered` (for abstract TPU devices, see hardware.py)
and returns XLA's per-device memory analysis and cost analysis. A program that does not
fit does not compile: XLA:TPU raises RESOURCE_EXHAUSTED with the bytes it needed and the
bytes available, which are returned instead (a plan that does not fit is an answer).
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# XLA:TPU's out-of-memory messages (HumanReadableNumBytes: binary units).
_NEEDED = (re.compile(r"required [^()]*\(([\d.]+)([KMGT]?)\) exceeds available HBM "
                      r"\(([\d.]+)([KMGT]?)\)"),
           re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))


def _bytes(number: str, unit: str) -> float:
  return float(number) * _UNITS[unit]


def out_of_memory(message: str) -> dict[str, float] | None:
  """(needed, available) bytes from XLA's out-of-memory message; None for other errors."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  for pattern in _NEEDED:
    if m := pattern.search(message):
      needed, available = _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4))
      return {"needed_bytes": needed, "available_bytes": available}
  return {"needed_bytes": float("nan"), "available_bytes": float("nan")}


def analyze(lowered: jax.stages.Lowered) -> dict[str, Any]:
  """Compiles `lowered`; returns its per-device figures, or why it does not fit.

  `compiled`: argument/temp/output/alias bytes and compile seconds; `bytes_accessed` and
  `flops` from XLA's cost analysis (a static estimate: a loop body counts once);
  `hlo`: the optimized module's text. Out of memory: `out_of_memory` and the message.
  """
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    oom = out_of_memory(str(e))
    if oom is None:
      raise
    return {"compiled": None, "out_of_memory": oom,
            "compile_seconds": time.perf_counter() - start,
            "message": str(e).splitlines()[0][:500]}
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  return {
      "compiled": {
          "argument_bytes": memory.argument_size_in_bytes,
          "temp_bytes": memory.temp_size_in_bytes,
          "output_bytes": memory.output_size_in_bytes,
          "alias_bytes": memory.alias_size_in_bytes,
          "compile_seconds": round(seconds, 1),
      },
      "bytes_accessed": cost.get("bytes accessed"),
      "flops": cost.get("flops"),
      "hlo": compiled.as_text(),
  }


def peak_bytes(compiled: dict[str, int]) -> int:
  """Device memory a compiled step holds at its peak: its arguments, its outputs that
  do not reuse (alias) an argument's buffer, and its temporaries."""
  return (compiled["argument_bytes"] + compiled["output_bytes"] - compiled["alias_bytes"]
          + compiled["temp_bytes"])
