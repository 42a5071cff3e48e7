"""Writes a trained model as a regular converted checkpoint that `generate.py` loads.

Adapters are merged into their weights first (`lora.merge_lora`), so the result is a
plain model in the layout `launch/convert.py` writes (`checkpoint/layout.py`):
`<out>/smallfour_config.json`, `<out>/params/` and the tokenizer as `<out>/tekken.json`.
`<out>` may also hold the run's training checkpoints; they do not disturb loading.
New parameters are written beside the old ones and swapped in by renames, with the
config written last, so an interrupted export leaves the previous one loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from smallfour import config as config_lib
from smallfour.checkpoint import tree
from smallfour.checkpoint.layout import FORMAT_VERSION, PARAMS_DIR, TOKENIZER_FILE
from smallfour.nn.decoder import Transformer
from smallfour.train import lora


def export(model: Transformer, out_dir: str, tokenizer_file: str,
           source: dict[str, Any]) -> None:
  """Merges `model`'s adapters (in place) and writes it under `out_dir`.

  source: recorded as the checkpoint's `source` (what it was trained from).
  """
  lora.merge_lora(model)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  dtypes = {str(v.get_value().dtype) for _, v in flat}
  if len(dtypes) != 1 or not dtypes <= {"float32", "bfloat16"}:
    raise ValueError(f"cannot export parameters of dtypes {sorted(dtypes)}")
  params = tree.nest({path: v.get_value() for path, v in flat})
  staging = os.path.join(out_dir, PARAMS_DIR + ".partial")
  old = os.path.join(out_dir, PARAMS_DIR + ".old")
  for leftover in (staging, old):
    if os.path.exists(leftover):
      shutil.rmtree(leftover)
  ocp.save(os.path.abspath(staging), params)
  shutil.copyfile(tokenizer_file, os.path.join(out_dir, TOKENIZER_FILE + ".partial"))
  os.replace(os.path.join(out_dir, TOKENIZER_FILE + ".partial"),
             os.path.join(out_dir, TOKENIZER_FILE))
  final = os.path.join(out_dir, PARAMS_DIR)
  if os.path.exists(final):
    os.rename(final, old)
  os.rename(staging, final)
  meta = {"format_version": FORMAT_VERSION, "text": model.cfg.to_dict(),
          "param_dtype": dtypes.pop(), "source": source, "tokenizer": TOKENIZER_FILE}
  config_file = os.path.join(out_dir, config_lib.SMALLFOUR_CONFIG_FILE)
  with open(config_file + ".partial", "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(config_file + ".partial", config_file)
  if os.path.exists(old):
    shutil.rmtree(old)
