"""Released checkpoint (HF or native, FP8/BF16) -> a self-contained orbax checkpoint.

Streams one parameter at a time: build it in the stored dtype (into a reused buffer),
hand it to a `TreeWriter` that writes it in the background while the next one is built,
and fsync each layer's files in the background. Everything is written under
`<dst>.partial/`, fsynced, and renamed to `<dst>` only at the end, so a killed (or
power-cut) conversion never leaves a `<dst>` that restores, and a rerun starts cleanly.

The destination layout is in `layout.py`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import time
import weakref
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from smallfour import config as config_lib
from smallfour import summary
from smallfour.checkpoint import quant as ckpt_quant
from smallfour.checkpoint.assemble import build_params
from smallfour.checkpoint.formats import SourceCheckpoint, open_checkpoint
from smallfour.checkpoint.keymap import Path, TensorMap
from smallfour.checkpoint.layout import (DTYPES, FORMAT_VERSION, PARAMS_DIR, STAGING_SUFFIX,
                                         STORED_DTYPES, TOKENIZER_FILE, CheckpointError)
from smallfour.checkpoint.orbax_writer import TreeWriter, fsync
from smallfour.nn import quant as quant_lib

log = logging.getLogger(__name__)


# Bytes being written may reach this fraction of the largest layer (at least its largest
# parameter) before building waits: enough to keep the writer busy, and with the
# parameter being built, peak memory stays about one layer.
PENDING_FRACTION = 0.5
# Expert slices are built on this many threads (numpy's copies and lookups release the
# GIL). On the 2-core CI VM: 1.15-1.3x on building alone when the second core is free,
# no difference while another job keeps it busy.
BUILD_THREADS = min(2, os.cpu_count() or 1)


class _BufferPool:
  """Output arrays, handed out again once written.

  Touching fresh memory costs ~0.6 ms/MB here (page faults), as much as building the
  values into it; every decoder layer has the same shapes, so reusing the previous
  layer's buffers takes that cost off all but the first. Used from one thread (the
  writer's `on_done` runs on the caller's).
  """

  def __init__(self):
    self._free: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}
    self._ours = weakref.WeakValueDictionary()  # id -> array, for arrays we allocated

  def empty(self, shape, dtype) -> np.ndarray:
    free = self._free.get((tuple(shape), np.dtype(dtype)))
    if free:
      return free.pop()
    array = np.empty(shape, dtype)
    self._ours[id(array)] = array
    return array

  def owns(self, array: np.ndarray) -> bool:
    return self._ours.get(id(array)) is array

  def recycle(self, array: np.ndarray) -> None:
    self._free.setdefault((array.shape, array.dtype), []).append(array)

  def retain(self, keys: set[tuple[tuple[int, ...], np.dtype]]) -> None:
    """Drops the free buffers of any other shape (e.g. decoder layers' before the head)."""
    self._free = {k: v for k, v in self._free.items() if k in keys}


def _nbytes(var: Any) -> int:
  return int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize


def _stored(flat: dict[Path, Any], path: Path) -> list[Path]:
  """The stored arrays a key-map target becomes: itself, or FP8 codes and scale."""
  return [path] if path in flat else [path + ("codes",), path + ("scale",)]


def _check_fp8_sources(ckpt: SourceCheckpoint, flat: dict[Path, Any]) -> None:
  """Every tensor an FP8-resident weight is built from is stored as e4m3."""
  for group in ckpt.maps:
    for m in group:
      if m.path not in flat:
        for name in m.sources:
          if ckpt.source.dtypes[name] != "F8_E4M3":
            raise CheckpointError(
                f"--dtype=fp8 keeps the release's FP8 weights as they are, but tensor {name} "
                f"in {ckpt.source.location[name]} is {ckpt.source.dtypes[name]}; convert "
                "this checkpoint to bfloat16 instead")


def _by_path(group: list[TensorMap]) -> dict[Path, list[TensorMap]]:
  by_path: dict[Path, list[TensorMap]] = {}
  for m in group:
    by_path.setdefault(m.path, []).append(m)
  return by_path


def convert(src: str, dst: str, *, dtype: str = "bfloat16",
            softmax_scale: str | None = None, kind: Literal["auto", "hf", "native"] = "auto",
            image_processor: str | None = None, progress: bool = True,
            group_size: int = quant_lib.DEFAULT_GROUP_SIZE,
            dense_dtype: str = "bfloat16") -> dict[str, Any]:
  """Converts `src` into a new checkpoint at `dst`; returns byte and time statistics.

  Args:
    dtype: the stored dtype: "bfloat16" or "float32" (FP8 is dequantized in float32 first),
      or "fp8": the e4m3 linears stay e4m3 with their multipliers (FP8-resident restore,
      half the bytes), everything else bfloat16; the source must be FP8. "int8" / "int4":
      routed experts quantized from the float32 values (int8 per output channel, int4 in
      groups of `group_size` inputs), attention and shared/dense MLPs as `dense_dtype`
      (bfloat16, or int8 per channel), the rest bfloat16 (nn/quant.py).
    softmax_scale: overrides the mode the source implies ("plain"/"hf_mscale_fold"):
      params.json's yarn.apply_scale when it is there, else config.json's transformers
      semantics (`smallfour.config.files.read_release_dir`).
    kind: the source tensors; "auto" detects them from the directory's files.
    image_processor: overrides the image preprocessing the source implies
      ("mistral_common" when params.json is there, else "transformers";
      smallfour.chat.image_processing).
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
  override = "" if softmax_scale is None else f"; --softmax_scale={softmax_scale} overrides it"
  if image_processor is not None:
    if cfg.vision is None or image_processor not in config_lib.IMAGE_PROCESSORS:
      raise CheckpointError(f"--image_processor={image_processor!r}: expected one of "
                            f"{config_lib.IMAGE_PROCESSORS} for a model with a vision encoder")
    cfg = cfg.replace(vision=cfg.vision.replace(image_processor=image_processor))
    override += f"; --image_processor={image_processor} overrides it"
  log.info("%s: %s tensors, %s%s", src, ckpt.kind, ckpt.config_note, override)
  ckpt.validate()

  staging = dst.rstrip("/") + STAGING_SUFFIX
  if os.path.exists(staging):
    log.warning("removing %s left by an unfinished conversion", staging)
    shutil.rmtree(staging)
  os.makedirs(staging)
  try:
    quant = (quant_lib.Quant(dtype, group_size, dense_dtype) if dtype in quant_lib.INT_DTYPES
             else None)
    flat = summary.abstract_flat(cfg, np.dtype(STORED_DTYPES[dtype]), fp8=dtype == "fp8",
                                 quant=quant)
  except quant_lib.QuantError as e:
    shutil.rmtree(staging)
    raise CheckpointError(str(e)) from None
  if dtype == "fp8":
    _check_fp8_sources(ckpt, flat)
  groups = [_by_path(g) for g in ckpt.maps]
  group_bytes = [sum(_nbytes(flat[s]) for p in g for s in _stored(flat, p)) for g in groups]
  largest = max(_nbytes(flat[s]) for g in groups for p in g for s in _stored(flat, p))
  source_bytes = sum(os.path.getsize(f) for f in set(ckpt.source.location.values()))
  bar = tqdm(total=sum(group_bytes), unit="B", unit_scale=True, desc="convert",
             disable=not progress)
  pool = _BufferPool()
  written = 0
  with TreeWriter(os.path.join(staging, PARAMS_DIR), max_pending_bytes=max(
      largest, int(PENDING_FRACTION * max(group_bytes)))) as writer, \
      concurrent.futures.ThreadPoolExecutor(BUILD_THREADS) as builders:
    for i, group in enumerate(groups):
      bar.set_postfix(layer=i if i < cfg.num_layers else "embed/head")
      pool.retain({(tuple(flat[s].shape), np.dtype(flat[s].dtype))
                   for p in group for s in _stored(flat, p)})
      for maps in group.values():
        for path, array in build_params(maps, ckpt.source, flat, empty=pool.empty,
                                        executor=builders).items():
          if array.dtype == ckpt_quant.INT4:  # two codes per stored byte
            packed = ckpt_quant.pack_int4(array)
            if pool.owns(array):
              pool.recycle(array)
            array = packed
          writer.write(path, array, on_done=pool.recycle if pool.owns(array) else None)
          written += array.nbytes
          bar.update(array.nbytes)
      ckpt.source.release()
      writer.flush()  # fsync this layer's files in the background
  bar.close()

  if ckpt.tokenizer:
    shutil.copyfile(ckpt.tokenizer, os.path.join(staging, TOKENIZER_FILE))
    fsync(os.path.join(staging, TOKENIZER_FILE))
  meta = {
      "format_version": FORMAT_VERSION,
      "text": cfg.to_dict(),
      "param_dtype": dtype,
      **({"quant": quant.to_dict()} if quant else {}),
      "source": {"kind": ckpt.kind, "path": os.path.abspath(src)},
      "tokenizer": TOKENIZER_FILE if ckpt.tokenizer else None,
  }
  with open(os.path.join(staging, config_lib.SMALLFOUR_CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  fsync(os.path.join(staging, config_lib.SMALLFOUR_CONFIG_FILE))
  fsync(staging)
  os.rename(staging, dst)  # the commit point
  fsync(os.path.dirname(os.path.abspath(dst)))  # ... made durable
  seconds = time.perf_counter() - start
  return {"source_bytes": source_bytes, "written_bytes": written, "seconds": seconds}

