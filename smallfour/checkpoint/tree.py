"""Flat parameter paths <-> the nested string-keyed dicts an orbax pytree stores."""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

from smallfour.checkpoint.keymap import Path

T = TypeVar("T")


def nest(flat: Mapping[Path, T]) -> dict[str, Any]:
  """{("layers", 0, "attn", "k_up"): x} -> {"layers": {"0": {"attn": {"k_up": x}}}}."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = value
  return out


def lookup(nested: Mapping[str, Any], path: Path) -> Any:
  node: Any = nested
  for key in path:
    node = node[str(key)]
  return node
