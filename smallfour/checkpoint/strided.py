"""Fast numpy materialisation of transposed views.

numpy copies a transposed 2-D view (`dst[...] = w.T`) element by element at ~0.8 GB/s
here. Copying it in column blocks whose destination rows are 32 bytes long
(`dst[:, c:c+16] = w.T[:, c:c+16]` for 2-byte elements) keeps both sides in cache and
runs at 2-3.4 GB/s, with no compilation; jax's transposes are fast on small arrays but
its host->device copies run at ~0.8 GB/s and every new shape costs a compile.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

_BLOCK_BYTES = 32  # destination run per row; measured best for 1, 2 and 4-byte elements
UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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


def bits(x: np.ndarray) -> np.ndarray:
  """`x` viewed as unsigned integers of its width: numpy's fastest copy loops."""
  return x.view(UINTS[x.dtype.itemsize]) if x.dtype.itemsize in UINTS else x


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
  """`dst[...] = src` for a C-contiguous `dst`, blocked when `src` is a transposed 2-D view."""
  if src.dtype != dst.dtype:
    dst[...] = src
    return
  dst, src = bits(dst), bits(src)
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
