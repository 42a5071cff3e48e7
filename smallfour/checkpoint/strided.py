"""Fast numpy materialisation of transposed views, and FP8 dequantisation by table lookup.

numpy copies a transposed 2-D view (`dst[...] = w.T`) element by element at ~0.8 GB/s
here. Copying it in column blocks whose destination rows are 32 bytes long
(`dst[:, c:c+16] = w.T[:, c:c+16]` for 2-byte elements) keeps both sides in cache and
runs at 2-3.4 GB/s, with no compilation; jax's transposes are fast on small arrays but
its host->device copies run at ~0.8 GB/s and every new shape costs a compile.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

import ml_dtypes
import numpy as np

_BLOCK_BYTES = 32  # destination run per row; measured best for 1, 2 and 4-byte elements
_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class Scratch(threading.local):
  """A per-thread buffer handed out again and again (each `empty` reuses it).

  Fresh pages cost ~0.6 ms/MB to fault in here (zeroed huge pages), and glibc hands
  large freed blocks back to the kernel, so short-lived buffers are better reused.
  """

  def __init__(self):
    self._buffer = np.empty(0, np.uint8)

  def empty(self, shape, dtype) -> np.ndarray:
    """An uninitialised `shape` array, valid until this thread's next `empty`."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if self._buffer.size < nbytes:
      self._buffer = np.empty(nbytes, np.uint8)
    return self._buffer[:nbytes].view(dtype).reshape(shape)


_TRANSPOSED_CODES = Scratch()


def _bits(x: np.ndarray) -> np.ndarray:
  """`x` viewed as unsigned integers of its width: numpy's fastest copy loops."""
  return x.view(_UINTS[x.dtype.itemsize]) if x.dtype.itemsize in _UINTS else x


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
  """`dst[...] = src` for a C-contiguous `dst`, blocked when `src` is a transposed 2-D view."""
  if src.dtype != dst.dtype:
    dst[...] = src
    return
  dst, src = _bits(dst), _bits(src)
  if src.ndim != 2 or src.flags.c_contiguous or abs(src.strides[0]) >= abs(src.strides[1]):
    dst[...] = src
    return
  block = max(1, _BLOCK_BYTES // src.itemsize)
  for c in range(0, src.shape[1], block):
    dst[:, c:c + block] = src[:, c:c + block]


def contiguous(x: np.ndarray, empty: Callable[..., np.ndarray] = np.empty) -> np.ndarray:
  """`np.ascontiguousarray(x)` (a copy from `empty(shape, dtype)` unless already so),
  with `copy_into`'s blocked copy for transposed views."""
  if x.flags.c_contiguous:
    return x
  out = empty(x.shape, x.dtype)
  copy_into(out, x)
  return out


def transpose(w: np.ndarray) -> np.ndarray:
  """`w.T` of a 2-D array, materialised (so a following reshape is free)."""
  return contiguous(w.T)


def lookup_into(dst: np.ndarray, table: np.ndarray, codes: np.ndarray) -> None:
  """`dst[...] = table[codes]` (as bits) for a C-contiguous `dst`.

  `codes` (uint8) may be a transposed view: transposing the 1-byte codes and then
  looking them up into place is ~1.5x faster than looking up, then transposing 2 bytes.
  Codes are looked up in pairs, as uint16 indices into a 65536-entry table of value
  pairs: numpy widens every index to intp first, so half the indices is ~1.9x faster.
  """
  codes, out = contiguous(codes, _TRANSPOSED_CODES.empty).reshape(-1), _bits(dst).reshape(-1)
  wide = _UINTS.get(2 * out.itemsize)
  if codes.size % 2 or wide is None or sys.byteorder != "little":
    np.take(table, codes, out=out, mode="clip")  # uint8 indices: always in range
    return
  table = table.astype(wide)
  pairs = (table[:, None] << (8 * out.itemsize) | table[None, :]).reshape(-1)  # [hi, lo]
  np.take(pairs, codes.view(np.uint16), out=out.view(wide), mode="clip")


def fp8_table(scale: np.ndarray | float, dtype: np.dtype) -> np.ndarray:
  """The 256 values `dtype(float32(code) · scale)` of the e4m3 codes, as stored bits.

  Exactly the per-element arithmetic (float32 product, one rounding to `dtype`), so
  looking the codes up equals dequantizing them.
  """
  codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  return _bits((codes.astype(np.float32) * np.float32(scale)).astype(dtype))


def dequantize_fp8(raw: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`dtype(float32(raw) · scale)` by table lookup (~2 GB/s; the arithmetic, ~0.3 GB/s).

  Args:
    raw: e4m3 codes, any shape.
    scale: one multiplier, or one per index of `raw`'s first axis.
  """
  dtype = np.dtype(dtype)
  out = np.empty(raw.shape, dtype)
  codes, bits = raw.view(np.uint8), _bits(out)
  scale = np.asarray(scale, np.float32).reshape(-1)
  if scale.size == 1:
    np.take(fp8_table(scale[0], dtype), codes, out=bits)
  elif raw.ndim and scale.size == raw.shape[0]:
    for i, s in enumerate(scale):
      np.take(fp8_table(s, dtype), codes[i], out=bits[i])
  else:
    raise ValueError(f"{scale.size} scales for a tensor of shape {raw.shape}")
  return out
