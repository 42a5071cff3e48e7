"""Model presets, and `resolve` for a `--config` flag (preset name or directory)."""

import os
from typing import Callable

from smallfour.configs import small4_119b, tiny
from smallfour import config as config_lib
from smallfour.config import files as config_files

PRESETS: dict[str, Callable[[], config_lib.TextConfig]] = {
    "small4_119b": small4_119b.get_config,
    "tiny": tiny.get_config,
}


def resolve(spec: str) -> config_lib.TextConfig:
  """A preset name, or a directory holding smallfour_config.json, config.json or params.json."""
  if spec in PRESETS:
    return PRESETS[spec]()
  if os.path.isdir(spec):
    return config_files.load_dir(spec)
  raise config_lib.ConfigError(
      f"--config={spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
