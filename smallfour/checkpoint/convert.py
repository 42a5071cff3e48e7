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
from typing import Any, Iterator, Literal

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from tqdm import tqdm

from smallfour import config as config_lib
from smallfour import summary
from smallfour.checkpoint import tree
from smallfour.checkpoint.assemble import CheckpointError, build_params
from smallfour.checkpoint.formats import open_checkpoint
from smallfour.checkpoint.keymap import Path, TensorMap

PARAMS_DIR = "params"
STAGING_SUFFIX = ".partial"
DTYPES = ("bfloat16", "float32")


# Parameters are saved in chunks of about this size: orbax copies what it is given, so
# the chunk bounds that copy, while fewer, larger saves amortise orbax's per-call cost.
SAVE_CHUNK_BYTES = 64 * 2**20


def _group_bytes(group: list[TensorMap], flat: dict[Path, Any]) -> int:
  return sum(flat[p].size * np.dtype(flat[p].dtype).itemsize for p in {m.path for m in group})


def _build_in_chunks(group: list[TensorMap], source, flat: dict[Path, Any]
                     ) -> Iterator[dict[Path, np.ndarray]]:
  """Builds a layer's parameters one at a time, yielding them in ~SAVE_CHUNK_BYTES chunks."""
  by_path: dict[Path, list[TensorMap]] = {}
  for m in group:
    by_path.setdefault(m.path, []).append(m)
  chunk: dict[Path, np.ndarray] = {}
  for path, maps in by_path.items():
    chunk.update(build_params(maps, source, flat))
    if sum(a.nbytes for a in chunk.values()) >= SAVE_CHUNK_BYTES:
      yield chunk
      chunk = {}
  if chunk:
    yield chunk


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
  # Random-looking weights do not compress; zstd would only cost time.
  ctx = ocp.Context()
  ctx.array.saving.use_compression = False
  flat = dict(nnx.to_flat_state(abstract))
  bar = tqdm(total=sum(_group_bytes(g, flat) for g in ckpt.maps), unit="B",
             unit_scale=True, desc="convert", disable=not progress)
  pending = None  # orbax writes one chunk in the background while the next is built
  with ctx:
    for i, group in enumerate(ckpt.maps):
      bar.set_postfix(layer=i if i < cfg.num_layers else "embed/head")
      for built in _build_in_chunks(group, ckpt.source, flat):
        if pending is not None:
          pending.result()
        pending = ocp.partial.save_async(params_dir, tree.nest(built))
        size = sum(a.nbytes for a in built.values())
        written += size
        bar.update(size)
        del built
      ckpt.source.release()
    if pending is not None:
      pending.result()
    ocp.partial.finalize(params_dir)
  bar.close()

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
