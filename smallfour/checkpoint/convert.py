"""Released checkpoint (HF or native, FP8/BF16) -> a self-contained orbax checkpoint.

Streams one decoder layer at a time: build that layer's parameters in the stored
dtype, append them to an orbax partial save, unmap the source files. Everything is
written under `<dst>.partial/` and renamed to `<dst>` only at the end, so a killed
conversion never leaves a `<dst>` that restores, and a rerun starts cleanly.

Destination layout::

  <dst>/smallfour_config.json   our TextConfig (softmax-scale mode recorded), dtype, source
  <dst>/params/                 orbax pytree {"embedder": .., "layers": {"0": {..}}, ..}
  <dst>/tekken.json             the tokenizer, when the source ships one
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Literal

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from tqdm import tqdm

from smallfour import config as config_lib
from smallfour import summary
from smallfour.checkpoint import tree
from smallfour.checkpoint.assemble import CheckpointError, build_params
from smallfour.checkpoint.formats import open_checkpoint

PARAMS_DIR = "params"
STAGING_SUFFIX = ".partial"
DTYPES = ("bfloat16", "float32")


def convert(src: str, dst: str, *, dtype: str = "bfloat16",
            softmax_scale: str | None = None, kind: Literal["auto", "hf", "native"] = "auto",
            progress: bool = True) -> dict[str, Any]:
  """Converts `src` into a new checkpoint at `dst`; returns byte and time statistics.

  Args:
    dtype: the stored dtype, "bfloat16" or "float32" (FP8 is dequantized in float32 first).
    softmax_scale: overrides the mode the source format implies ("plain"/"hf_mscale_fold").
    kind: the source layout; "auto" detects it from the directory's files.
  """
  if dtype not in DTYPES:
    raise CheckpointError(f"--dtype={dtype!r}; expected one of {DTYPES}")
  if os.path.exists(dst):
    raise CheckpointError(f"destination {dst} already exists; remove it or choose another --dst")
  start = time.perf_counter()
  ckpt = open_checkpoint(src, kind)
  cfg = ckpt.config
  if softmax_scale is not None:
    if softmax_scale not in config_lib.SOFTMAX_SCALE_MODES:
      raise CheckpointError(f"--softmax_scale={softmax_scale!r}; expected one of "
                            f"{config_lib.SOFTMAX_SCALE_MODES}")
    cfg = cfg.replace(softmax_scale_mode=softmax_scale)
  ckpt.validate()

  staging = dst.rstrip("/") + STAGING_SUFFIX
  if os.path.exists(staging):
    logging.warning("removing %s left by an unfinished conversion", staging)
    shutil.rmtree(staging)
  os.makedirs(staging)
  abstract = summary.abstract_params(cfg, np.dtype(dtype))
  params_dir = os.path.join(staging, PARAMS_DIR)
  source_bytes = sum(os.path.getsize(f) for f in set(ckpt.source.location.values()))
  written = 0
  bar = tqdm(total=len(ckpt.maps), unit="layer", desc="convert", disable=not progress)
  for i, group in enumerate(ckpt.maps):
    built = build_params(group, ckpt.source, abstract)
    written += sum(a.nbytes for a in built.values())
    ocp.partial.save(params_dir, tree.nest(built))
    del built
    ckpt.source.release()
    bar.update(1)
    bar.set_postfix(written=f"{written / 2**30:.2f} GiB",
                    layer=i if i < cfg.num_layers else "embed/head")
  bar.close()
  ocp.partial.finalize(params_dir)

  if ckpt.tokenizer:
    shutil.copyfile(ckpt.tokenizer, os.path.join(staging, "tekken.json"))
  meta = {
      "format_version": 1,
      "text": cfg.to_dict(),
      "param_dtype": dtype,
      "source": {"kind": ckpt.kind, "path": os.path.abspath(src)},
      "tokenizer": "tekken.json" if ckpt.tokenizer else None,
  }
  with open(os.path.join(staging, config_lib.SMALLFOUR_CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  os.rename(staging, dst)  # the commit point
  seconds = time.perf_counter() - start
  return {"source_bytes": source_bytes, "written_bytes": written, "seconds": seconds}
