"""The machinery of the config field tables: where a field sits in each format, and the
walk that reads a file dict through a table or writes one from it.

A table (`text_fields.FIELDS`, `vision_fields.FIELDS`) lists `Field`s; each places one
config field in an HF `config.json` ("hf") and a Mistral-native `params.json` ("native")
as a `Key` (a path, maybe with a default), or as `Fixed` (the format cannot hold it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from smallfour.config.model import ConfigError

FILES = {"hf": "config.json", "native": "params.json"}

_REQUIRED = object()
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Key:
  """Where a format stores a field: a dotted path, or alternatives (the first is written)."""

  path: str | tuple[str, ...]
  default: Any = _REQUIRED  # a value, or a function of the fields read before this one
  falsy: bool = False  # any falsy value means the default, as transformers' `x or d` reads
  nullable: bool = False  # null is a value rather than a missing field

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.path,) if isinstance(self.path, str) else self.path


@dataclasses.dataclass(frozen=True)
class Fixed:
  """A field the format does not hold: its reader assumes `value`, its writer refuses others."""

  value: Any


@dataclasses.dataclass(frozen=True)
class Tokenizer(Fixed):
  """A token id params.json leaves to tekken.json: read as `value`, dropped when written."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field's place in each format."""

  name: str  # a TextConfig (VisionConfig) field; "rope.x" is RopeConfig.x
  hf: Key | Fixed
  native: Key | Fixed


def _get(d: Any, path: str) -> Any:
  for part in path.split("."):
    if not isinstance(d, Mapping) or part not in d:
      return _MISSING
    d = d[part]
  return d


def _lookup(d: Mapping[str, Any], key: Key) -> Any:
  for path in key.paths:
    value = _get(d, path)
    if value is _MISSING or (value is None and not key.nullable) or (key.falsy and not value):
      continue
    return value
  return _MISSING


def require(d: Mapping[str, Any], key: str, where: str) -> Any:
  """`d[key]`; ConfigError when it is missing or null."""
  if key not in d or d[key] is None:
    raise ConfigError(f"{where}: missing required field {key!r}")
  return d[key]


def expect(d: Mapping[str, Any], key: str, expected: Any, where: str) -> None:
  """A field with no config counterpart: absent, or the one value this model allows."""
  value = d.get(key, expected)
  if value != expected:
    raise ConfigError(f"{where}: {key}={value!r} is not supported (expected {expected!r})")


def _coerce(name: str, value: Any, where: str, types: Mapping[str, str]) -> Any:
  kind = types[name]
  if kind == "int | None" and isinstance(value, list):  # transformers allows several EOS ids
    return value[0]
  convert = {"float": float, "bool": bool}.get(kind)
  if kind == "int" and name.startswith("rope."):
    convert = int
  try:
    return convert(value) if convert else value
  except (TypeError, ValueError):
    raise ConfigError(f"{where}: {name}={value!r} is not a number") from None


def read(fmt: str, d: Mapping[str, Any], where: str, fields: tuple[Field, ...],
         types: Mapping[str, str]) -> tuple[dict[str, Any], set[str]]:
  """Every field's value in `d`, and the names of those `d` states (not defaulted)."""
  values: dict[str, Any] = {}
  stated = set()
  for f in fields:
    spec = getattr(f, fmt)
    if isinstance(spec, Fixed):
      values[f.name] = spec.value
      continue
    value = _lookup(d, spec)
    if value is _MISSING:
      if spec.default is _REQUIRED:
        parent, _, leaf = spec.paths[0].rpartition(".")
        at = ":".join([where, *filter(None, parent.split("."))])
        raise ConfigError(f"{at}: missing required field {leaf!r}")
      value = spec.default(values) if callable(spec.default) else spec.default
    else:
      stated.add(f.name)
    values[f.name] = _coerce(f.name, value, where, types)
  return values, stated


def write(fmt: str, values: Mapping[str, Any], fields: tuple[Field, ...],
          prefix: str = "") -> dict[str, Any]:
  """The file fragment holding `values` ({field: value}); errors name `prefix` + field."""
  file = FILES[fmt]
  out: dict[str, Any] = {}
  held: dict[str, tuple[str, Any]] = {}  # path -> (field, value)
  for f in fields:
    spec, value, name = getattr(f, fmt), values[f.name], prefix + f.name
    if isinstance(spec, Tokenizer):
      continue
    if isinstance(spec, Fixed):
      if value != spec.value:
        raise ConfigError(f"{file} cannot hold {name}={value!r} "
                          f"(its readers assume {spec.value!r})")
      continue
    path = spec.paths[0]
    if path in held:
      if held[path][1] != value:
        raise ConfigError(f"{file} holds {held[path][0]} and {name} in one field, {path}, "
                          f"but they differ ({held[path][1]!r} vs {value!r})")
      continue
    if spec.falsy and not value and value != spec.default:
      raise ConfigError(f"{file} cannot hold {name}={value!r} (read back as {spec.default!r})")
    held[path] = (name, value)
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out
