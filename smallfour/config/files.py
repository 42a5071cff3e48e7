"""A directory's config: ours, or a released checkpoint's, and which file decides.

A released directory holds an HF `config.json`, a native `params.json`, or both (the
hub layout). When params.json is there it decides, as in Mistral's own stack: its
`yarn.apply_scale` sets the softmax scale whichever tensors are read; config.json
alone means transformers' semantics (`hf_mscale_fold` whenever mscale_all_dim is set).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

from smallfour.config.formats import from_hf, from_hub, from_params
from smallfour.config.model import SMALLFOUR_CONFIG_FILE, ConfigError, TextConfig


@dataclasses.dataclass(frozen=True)
class DirConfig:
  """The config of a released checkpoint directory, and what it was read from."""

  config: TextConfig
  source: str  # the JSON files read
  reason: str  # what set softmax_scale_mode

  def describe(self) -> str:
    mode = self.config.softmax_scale_mode
    note = f"config from {self.source}; softmax_scale_mode={mode}: {self.reason}"
    if self.config.vision is not None:
      # The same file decides: params.json means Mistral's stack, config.json transformers.
      note += f"; image_processor={self.config.vision.image_processor}"
    return note


def _load_json(file: str) -> Any:
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}: not valid JSON ({e})") from None
  except OSError as e:
    raise ConfigError(f"{file}: cannot be read ({e.strerror})") from None


def load_file(file: str, reader: Callable[[Any, str], TextConfig]) -> TextConfig:
  """Parses the JSON `file` and reads it with `reader` (from_hf, from_params, ...)."""
  return reader(_load_json(file), file)


def read_release_dir(path: str) -> DirConfig:
  """The config of a released directory: params.json's (checked against config.json when
  both are there, the hub layout), else config.json's."""
  hf_file, native_file = os.path.join(path, "config.json"), os.path.join(path, "params.json")
  has_hf = os.path.exists(hf_file)
  if os.path.exists(native_file):
    params = _load_json(native_file)
    if has_hf:
      cfg = from_hub(_load_json(hf_file), params, hf_file, native_file)
    else:
      cfg = from_params(params, native_file)
    apply_scale = params["yarn"].get("apply_scale")
    reason = (f"params.json yarn.apply_scale={json.dumps(apply_scale)}" if apply_scale is not None
              else "params.json has no yarn.apply_scale (false, as Mistral's stack reads it)")
    source = "params.json, cross-checked with config.json" if has_hf else "params.json"
    return DirConfig(cfg, source, reason)
  if has_hf:
    cfg = load_file(hf_file, from_hf)
    return DirConfig(cfg, "config.json", (
        "config.json alone: transformers >= 5.17 folds m(f, mscale_all_dim)² into the scale "
        f"when mscale_all_dim is set (here {cfg.rope.mscale_all_dim})"))
  raise ConfigError(f"{path}: no config.json or params.json found")


def load_dir(path: str) -> TextConfig:
  """Reads the config of a directory: ours, or a released one's (`read_release_dir`)."""
  ours = os.path.join(path, SMALLFOUR_CONFIG_FILE)
  if os.path.exists(ours):
    return load_file(ours, _from_smallfour_json)
  if not any(os.path.exists(os.path.join(path, n)) for n in ("config.json", "params.json")):
    raise ConfigError(f"{path}: no {SMALLFOUR_CONFIG_FILE}, config.json or params.json found")
  return read_release_dir(path).config


def _from_smallfour_json(data: Mapping[str, Any], where: str) -> TextConfig:
  try:
    return TextConfig.from_dict(data["text"])
  except (KeyError, TypeError) as e:
    raise ConfigError(f"{where}: malformed ({e!r})") from None
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
