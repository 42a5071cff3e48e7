"""Tensors of a directory of safetensors shards: direct reads, FP8 dequantization.

Only headers are read up front (names, dtypes, shapes, byte offsets), and validated by
`safetensors.safe_open`. Data is read per tensor (or per expert slice) with one `preadv`
into a fresh buffer at the header's offsets: ~5 GB/s from the page cache where
`safe_open(...).get_tensor` copies at ~1.5 GB/s, and nothing stays mapped, so the
resident set is only what the caller holds. torch is never imported.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from smallfour.checkpoint import fp8, strided
from smallfour.checkpoint.layout import CheckpointError

FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F8_E4M3"})
_NUMPY_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                 "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}


Index = int | tuple[int, slice] | None


def _block(shape: tuple[int, ...], itemsize: int, index: Index
           ) -> tuple[tuple[int, ...], int, int]:
  """(shape, byte offset, bytes) of `tensor[index]`: None, `i`, or `(i, slice(a, b))`."""
  strides = [itemsize] * (len(shape) + 1)
  for axis in reversed(range(len(shape))):
    strides[axis] = strides[axis + 1] * shape[axis]
  if index is None:
    return shape, 0, strides[0]
  i, rows = (index, None) if isinstance(index, int) else index
  if rows is None:
    return shape[1:], i * strides[1], strides[1]
  a, b, step = rows.indices(shape[1])
  if step != 1 or b < a:
    raise ValueError(f"read_index {index}: not a contiguous block")
  return (b - a,) + shape[2:], i * strides[1] + a * strides[2], (b - a) * strides[2]


def _data_offsets(file: str) -> dict[str, tuple[int, int]]:
  """{name: (first byte, end byte)} in `file`, from its (already validated) header."""
  with open(file, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  return {name: (8 + size + info["data_offsets"][0], 8 + size + info["data_offsets"][1])
          for name, info in header.items() if name != "__metadata__"}


class SafetensorsSource:
  """A `TensorSource` over safetensors files, with per-format scale names.

  Args:
    files: the shard paths, or an index JSON (`weight_map`) naming them.
    scale_name: weight name -> name of its dequantization multiplier (HF
      `weight_scale_inv`, native `qscale_weight`); `W = float(W_stored) · scale`.
  """

  def __init__(self, files: Sequence[str], scale_name: Callable[[str], str]):
    self.scale_name = scale_name
    self.location: dict[str, str] = {}
    self.dtypes: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._offsets: dict[str, tuple[int, int]] = {}
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()  # reads may come from several threads
    self._scratch = strided.Scratch()  # for reads copied out at once
    self._scales: dict[str, np.ndarray] = {}
    for file in files:
      self._index_header(file)

  @classmethod
  def from_index(cls, index_file: str, scale_name: Callable[[str], str]) -> "SafetensorsSource":
    try:
      with open(index_file) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"{index_file}: not a safetensors index ({e!r})") from None
    directory = os.path.dirname(index_file)
    files = sorted({os.path.join(directory, shard) for shard in weight_map.values()})
    for file in files:
      if not os.path.exists(file):
        raise CheckpointError(f"{index_file} names shard {os.path.basename(file)}, "
                              "which does not exist")
    source = cls(files, scale_name)
    source._check_index(index_file, weight_map)
    return source

  def _index_header(self, file: str) -> None:
    try:
      with safe_open(file, framework="np") as f:
        for name in f.keys():
          if name in self.location:
            raise CheckpointError(f"tensor {name} appears in both {self.location[name]} and {file}")
          sl = f.get_slice(name)
          self.location[name] = file
          self.dtypes[name] = sl.get_dtype()
          self.shapes[name] = tuple(sl.get_shape())
    except SafetensorError as e:
      raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    self._offsets.update(_data_offsets(file))

  def _check_index(self, index_file: str, weight_map: dict[str, str]) -> None:
    for name, shard in weight_map.items():
      if os.path.basename(self.location.get(name, "")) != shard:
        raise CheckpointError(f"{index_file} places tensor {name} in {shard}, which lacks it")

  # ---------------------------------------------------------------- TensorSource

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self.shapes:
      raise CheckpointError(f"missing tensor {name}")
    return self.shapes[name]

  def check_dtypes(self) -> None:
    for name, dtype in self.dtypes.items():
      if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name} in {self.location[name]} has dtype {dtype}; "
                              f"expected one of {sorted(FLOAT_DTYPES)}")
      if dtype == "F8_E4M3" and self.scale_name(name) not in self.location:
        raise CheckpointError(f"FP8 tensor {name} in {self.location[name]} has no scale "
                              f"tensor {self.scale_name(name)}")

  def read(self, name: str, index: Index = None, dtype=np.float32) -> np.ndarray:
    raw = self._pread(name, index)
    scale = self._scale(name, index)
    if scale is None:
      return raw.astype(dtype, copy=False)
    try:
      return fp8.dequantize_fp8(raw, scale, dtype)
    except ValueError as e:
      raise CheckpointError(f"tensor {name}: {e}") from None

  def read_fp8(self, name: str, index: Index = None) -> tuple[np.ndarray, np.ndarray] | None:
    """FP8 `tensor[index]` with one multiplier, as stored: (uint8 codes, scale [1] float32).

    The codes live in a per-thread buffer, valid until the thread's next `read_fp8`,
    `read_lookup` or `read_transient`. None for any other tensor.
    """
    if self.dtypes[name] != "F8_E4M3":
      return None
    scale = self._scale(name, index)
    if scale is None or scale.size != 1:
      return None
    return self._pread(name, index, self._scratch.empty).view(np.uint8), scale

  def read_lookup(self, name: str, index: Index = None, dtype=np.float32
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """`read_fp8`'s codes with `fp8.fp8_table` of their multiplier, or None.

    `table[codes]` is `read(...)`'s value; a caller can rearrange the 1-byte codes first
    and look them up straight into its output.
    """
    stored = self.read_fp8(name, index)
    return None if stored is None else (stored[0], fp8.fp8_table(stored[1][0], dtype))

  def read_transient(self, name: str, index: Index = None, dtype=np.float32
                     ) -> np.ndarray | None:
    """`read(...)` into the per-thread buffer `read_lookup` uses, for a caller that
    copies the values out at once; None unless stored as `dtype`, without multiplier."""
    if _NUMPY_DTYPES[self.dtypes[name]] != np.dtype(dtype) or self._scale(name, index) is not None:
      return None
    return self._pread(name, index, self._scratch.empty)

  def release(self) -> None:
    """Closes the open files; later reads reopen them."""
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()

  # ------------------------------------------------------------------- helpers

  def _pread(self, name: str, index: Index, empty: Callable[..., np.ndarray] = np.empty
             ) -> np.ndarray:
    """The stored values of `tensor[index]`, a contiguous block, read into `empty(...)`."""
    file = self.location[name]
    first, end = self._offsets[name]
    dtype = _NUMPY_DTYPES[self.dtypes[name]]
    shape, start, size = _block(self.shapes[name], dtype.itemsize, index)
    if first + start + size > end:
      raise CheckpointError(f"tensor {name} in {file}: {end - first} bytes for shape "
                            f"{self.shapes[name]} {self.dtypes[name]}")
    out = empty(shape, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with self._lock:
      if file not in self._fds:
        self._fds[file] = os.open(file, os.O_RDONLY)
      fd = self._fds[file]
    done = 0
    while done < size:  # preadv may return short counts (e.g. above 2 GiB)
      n = os.preadv(fd, [view[done:]], first + start + done)
      if n <= 0:
        raise CheckpointError(f"{file}: ends inside tensor {name} (truncated?)")
      done += n
    return out

  def _scale(self, name: str, index: Index) -> np.ndarray | None:
    """The multiplier(s) for `name` (or its slice `index`): one, or one per row of axis 0."""
    scale_name = self.scale_name(name)
    if scale_name not in self.location:
      return None
    if scale_name not in self._scales:  # scales are tiny; keep them across release()
      self._scales[scale_name] = np.array(self._pread(scale_name, None), np.float32).reshape(-1)
    scale = self._scales[scale_name]
    if scale.size == 1 or index is None:
      return scale
    expert = index[0] if isinstance(index, tuple) else index
    return scale[expert:expert + 1]  # one expert of a per-expert scale [E] / [E, 1, 1]
