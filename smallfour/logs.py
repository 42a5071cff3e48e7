"""What a launcher prints by default: its own lines, not its libraries' INFO logs.

orbax logs about a dozen INFO lines on every restore and save, jax one on every start
where libtpu is installed but no TPU is present, mistral-common one per tokenizer load.
A person running a launcher wants none of them unless asked: `--verbosity=0` (absl's
flag) shows them again. smallfour's own INFO lines (e.g. which files the converter
read and why) stay visible.
"""

from __future__ import annotations

import logging

from absl import flags


def library_logs_at_warning(own_loggers: tuple[str, ...] = ("smallfour",)) -> None:
  """Unless `--verbosity` was given, libraries log at WARNING and `own_loggers` at INFO.

  Call from a launcher's `main` (after absl parsed the flags).
  """
  if flags.FLAGS["verbosity"].present:
    return
  flags.FLAGS.verbosity = -1  # absl: WARNING, for the root logger and absl's own
  for name in own_loggers:
    logging.getLogger(name).setLevel(logging.INFO)
