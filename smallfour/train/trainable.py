"""Which parameters a run trains (`--trainable`); the rest are frozen.

A spec is a comma-separated list: `all`, `lora` (the adapters of `train.lora`), or
regular expressions searched in parameter paths written `layers/3/attn/q_a_proj`
(`router` selects every router, `layers/[0-9]+/ffn/shared` the shared experts).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from flax import nnx

from smallfour.train.lora import LoraParam

Filter = Callable[[tuple[Any, ...], Any], bool]


def path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(k) for k in path)


def parse(spec: str) -> Filter:
  """An nnx filter selecting the parameters `spec` names (raises ValueError)."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise ValueError("--trainable is empty; give `all`, `lora` or path patterns")
  patterns = []
  for part in parts:
    if part in ("all", "lora"):
      continue
    try:
      patterns.append(re.compile(part))
    except re.error as e:
      raise ValueError(f"--trainable: {part!r} is not a regular expression ({e})") from None

  def selected(path: tuple[Any, ...], value: Any) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    if "all" in parts or ("lora" in parts and isinstance(value, LoraParam)):
      return True
    name = path_name(path)
    return any(p.search(name) for p in patterns)

  return selected
