"""FP8-resident weights: e4m3 codes and float32 multipliers, dequantized where they are used.

The release stores its text linears as e4m3 with one multiplier per tensor (per expert
for the stacked routed experts); embeddings, norms, the router and the LM head stay
bf16 (spec ARCHITECTURE.md §6.1). Holding the codes instead of a bf16 copy halves the
weights' memory and the bytes a decode step reads. A weight is dequantized in the
expression that consumes it, `dtype(float32(code) · scale)`, so XLA fuses the
conversion into the matmul's operand and no whole bf16 copy of a weight exists. That
arithmetic is exactly what the converter does when it stores bf16 or float32
(`checkpoint/fp8.py`), so an FP8-resident model computes with the same weight values
as one restored dequantized.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

E4M3 = jnp.float8_e4m3fn
# How weights are held in device memory (`--weights_dtype`): plain arrays in the
# activation dtype (bfloat16 unless asked otherwise), or the release's linears in e4m3.
WEIGHTS_DTYPES = ("bfloat16", "fp8")
E4M3_MAX = 448.0  # largest finite e4m3 value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Array:
  """A weight as e4m3 `codes` and `scale`, one multiplier per index of its leading axes.

  codes: [*S, *W]; scale: [*S] float32 (S empty: one multiplier for the whole tensor).
  Indexing selects along the leading axes of both, so `experts[e]` or `experts[ids]`
  pick experts without dequantizing the others.
  """

  codes: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.codes.shape

  def __getitem__(self, index) -> "Fp8Array":
    return Fp8Array(self.codes[index], self.scale[index])

  def dequantize(self, dtype: jnp.dtype) -> jax.Array:
    """`dtype(float32(codes) · scale)`: [*S, *W] in dtype."""
    scale = self.scale.reshape(self.scale.shape + (1,) * (self.codes.ndim - self.scale.ndim))
    return (self.codes.astype(jnp.float32) * scale).astype(dtype)


def dense(w, dtype: jnp.dtype) -> jax.Array:
  """`w` as an array: an Fp8Array or an integer `quant.IntArray` dequantized to `dtype`,
  an array as it is."""
  return w.dequantize(dtype) if hasattr(w, "dequantize") else w


def quantize(w: jax.Array, scale_axes: int = 0) -> Fp8Array:
  """Per-tensor (or per index of the first `scale_axes` axes) absmax e4m3 quantization.

  For weights that do not come from an FP8 checkpoint (random presets, tests).
  """
  w = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=tuple(range(scale_axes, w.ndim)))
  scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
  scaled = w / scale.reshape(scale.shape + (1,) * (w.ndim - scale_axes))
  # Clipped: a quotient rounded just past the largest code would convert to NaN.
  return Fp8Array(jnp.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale)


class Fp8Weight(nnx.Module):
  """A weight held as e4m3 `codes` plus float32 `scale`; `w[...]` dequantizes it.

  Stands in for an `nnx.Param` in the layers, which read it the same way; code that can
  consume the codes directly (the routed experts) calls `packed()`.
  """

  def __init__(self, codes: nnx.Param, scale: nnx.Param, dtype: jnp.dtype):
    self.codes = codes
    self.scale = scale
    self.dtype = jnp.dtype(dtype)  # the dequantized (= activation) dtype

  def packed(self) -> Fp8Array:
    return Fp8Array(self.codes[...], self.scale[...])

  def __getitem__(self, index) -> jax.Array:
    return self.packed().dequantize(self.dtype)[index]


def packed(w) -> jax.Array | Fp8Array:
  """A parameter's value as the kernels take it: an array, or the codes and scales
  (an `Fp8Weight`, or a `quant.QuantWeight`)."""
  return w.packed() if hasattr(w, "packed") else w[...]
