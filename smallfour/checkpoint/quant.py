"""Integer weights in the converter: float32 values -> codes and scales, in numpy.

The same arithmetic as `qwix.quantize` under XLA (symmetric absmax; scale = absmax ·
float32(1 / (qmax + 0.5)), a scale of 1 for an all-zero group; codes =
round-half-to-even(value · (1 / scale)), clipped: XLA's simplifier turns qwix's divisions,
by a constant and by a broadcast scale, into these products),
so a converted checkpoint holds exactly what `nn/quant.py` would compute from the same
float32 values (tests/test_quant_convert.py checks it bit for bit). Numpy, not qwix,
because the converter streams numpy buffers one parameter (or one expert) at a time on
the host: a JAX round trip per expert slice would copy it to a device and back for
nothing. Which layout a parameter gets (per channel or group-wise) is read off its
abstract codes and scale shapes (`nn.quant.Layout`: group-wise codes hold their groups
as an axis): a scale axis of size 1 is reduced whole, one of the codes' size is per
channel (one in between would be groups of codes_dim / scale_dim).
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np

_QMAX = {np.dtype(np.int8): 127, np.dtype(ml_dtypes.int4): 7}
# qwix: the smallest scale it keeps, sqrt of float32's smallest normal (below it, 1).
_TINY_SQRT = np.sqrt(np.finfo(np.float32).tiny)


def is_integer_codes(dtype) -> bool:
  return np.dtype(dtype) in _QMAX


def quantize(value: np.ndarray, scale_shape: tuple[int, ...], dtype,
             codes_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """value [*S] float32 -> (codes [*S] in `dtype` (int8 or int4), scale `scale_shape`).

  Each scale axis divides its value axis; the value is split into (groups, group size)
  along every axis, reduced over the group sizes. `codes_out`: write the codes there.
  """
  dtype = np.dtype(dtype)
  qmax = _QMAX[dtype]
  value = np.asarray(value, np.float32)
  if len(scale_shape) != value.ndim or any(v % s for v, s in zip(value.shape, scale_shape)):
    raise ValueError(f"scale shape {scale_shape} does not tile a tensor of {value.shape}")
  split = [d for v, s in zip(value.shape, scale_shape) for d in (s, v // s)]
  grouped = value.reshape(split)
  inner = tuple(range(1, 2 * value.ndim, 2))
  absmax = np.abs(grouped).max(axis=inner, keepdims=True)
  scale = absmax * np.float32(1 / (qmax + 0.5))
  scale = np.where(scale < _TINY_SQRT, np.float32(1), scale).astype(np.float32)
  codes = np.clip(np.round(grouped * (np.float32(1) / scale)), -qmax - 1, qmax).reshape(value.shape)
  if codes_out is None:
    codes_out = np.empty(value.shape, dtype)
  codes_out[...] = codes.astype(dtype)
  return codes_out, scale.reshape(scale_shape)


# int4 codes are stored two to a byte (the zarr3 writer has no sub-byte codec): the
# element at an even index of the last axis in the low nibble, the next in the high one,
# which is how `jax.lax.bitcast_convert_type` reads a uint8 as two int4s.
INT4 = np.dtype(ml_dtypes.int4)


def packed_shape(shape: tuple[int, ...], name: str = "int4 codes") -> tuple[int, ...]:
  if not shape or shape[-1] % 2:
    raise ValueError(f"{name} of shape {shape}: int4 is stored in pairs along the last axis, "
                     "which must be even")
  return (*shape[:-1], shape[-1] // 2)


def pack_int4(codes: np.ndarray) -> np.ndarray:
  """int4 [..., 2n] -> uint8 [..., n], two codes per byte."""
  nibbles = codes.view(np.uint8) & 0x0F  # ml_dtypes int4 occupies one byte, sign-extended
  pairs = nibbles.reshape(packed_shape(codes.shape) + (2,))
  return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed):
  """uint8 [..., n] -> int4 [..., 2n] (a jax expression; run it where the bytes are)."""
  pairs = jax.lax.bitcast_convert_type(packed, INT4)  # [..., n, 2]
  return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
