"""Prints a model's parameter counts as JSON, without allocating the model.

  python launch/info.py --config=small4_119b
  python launch/info.py --config=/path/to/checkpoint_or_config_dir
"""

import json

from absl import app, flags

from smallfour import configs
from smallfour import summary
from smallfour.config import ConfigError

_CONFIG = flags.DEFINE_string(
    "config", "tiny", "A preset name or a directory with smallfour_config.json, an HF "
    "config.json or a native params.json.")


def main(argv):
  del argv
  try:
    cfg = configs.resolve(_CONFIG.value)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  counts = summary.param_counts(cfg)
  report = {"config": _CONFIG.value, **counts, "bytes_bfloat16": 2 * counts["total_params"],
            "text_config": cfg.to_dict()}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
