"""Weight-only int8 / int4: integer codes and float32 scales, dequantized where they are used.

Routed experts (97% of the released model's bytes) are held as int8 with one scale per
output channel, or int4 with one scale per `group_size` inputs of each output channel;
attention, the shared experts and the dense MLPs stay in the activation dtype (the
default) or become int8 per channel (`Quant.dense`). The default is measured: on the
fine-tuned tiny model, int8 attention took the mean KL from bf16 50x higher (1e-5 -> 6e-4
nats) and top-1 agreement from 99.5% to 98.6% (benchmarks/quant_accuracy.py), for 0.8%
of the 119B's bf16 bytes (int8 experts: 0.505 -> 0.513 of bf16; int4 g128: 0.276 ->
0.284). The embedding, norms, router and LM head always stay in the activation dtype: the
router picks experts from small logit gaps, and the embedding and head are 0.9% of the
bytes.

qwix computes the numbers: a weight's codes and scale (of the codes' rank, broadcast over
each group) are dequantized by `qwix.dequantize`, `float32(code) · scale`, then cast to
the activation dtype inside the expression that consumes it, so XLA fuses the conversion
into the matmul's operand and no whole bf16 copy of a weight exists (group-wise codes are
held with their groups as an axis for that, see `Layout`). Quantizing follows
`qwix.quantize`'s arithmetic (symmetric absmax, round half to even) in a form whose
rounding XLA cannot move (`quantize`). Ours besides: which tensors get which rule
(`rule`), and placing the integer weights in an already built model (`apply`), whose
layers then read them through `QuantWeight` like any parameter. qwix's own model
quantization (`qwix.quantize_model`) intercepts the einsums a module calls; ours run
inside custom MoE kernels and `shard_map`, where the weights themselves must be the
quantized arrays (`IntArray`, indexed per expert like `fp8.Fp8Array`). Its `ragged_dot`
on a bf16 × quantized pair dequantizes the weight first, as `fp8.dense` does, so the
kernels keep one path.

Names: a weight's "input axes" are the ones its matmuls contract (the fan-in); a scale
has size 1 there (per channel) or dim / group_size (group-wise), and the weight's size on
every other axis.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from smallfour.config import TextConfig
from smallfour.nn import fp8
from smallfour.nn.mla import MLA
from smallfour.nn.moe import MLP, RoutedExperts

INT_DTYPES = ("int8", "int4")
# `--weights_dtype`: plain, FP8-resident (nn/fp8.py) or integer weights (this file).
WEIGHTS_DTYPES = (*fp8.WEIGHTS_DTYPES, *INT_DTYPES)
# Attention and shared experts: int8 per channel, or kept in the activation dtype.
DENSE_DTYPES = ("int8", "bfloat16")
DEFAULT_GROUP_SIZE = 128
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}

# Input axes of each quantized linear, by the module that holds it (shapes in mla.py and
# moe.py). k_up is contracted over R when keys are expanded and over Dn when absorbed:
# its channels are (h, dn), as stored in the release's kv_b_proj rows.
_MLA_INPUT_AXES = {"q_a_proj": (0,), "q_b_proj": (0,), "kv_a_proj": (0,), "k_up": (1,),
                   "v_up": (2,), "o_proj": (0, 1)}
_MLP_INPUT_AXES = {"gate_proj": (-2,), "up_proj": (-2,), "down_proj": (-2,)}


class QuantError(ValueError):
  """A quantization request that cannot be honoured (dtype, group size, tensor)."""


@dataclasses.dataclass(frozen=True)
class Quant:
  """How the linears are held: routed experts as `experts` (int8 | int4, the latter in
  groups of `group_size` inputs), attention and shared/dense MLPs as `dense`."""

  experts: str
  group_size: int = DEFAULT_GROUP_SIZE
  dense: str = "bfloat16"

  def __post_init__(self):
    if self.experts not in INT_DTYPES:
      raise QuantError(f"weights_dtype={self.experts!r}: integer weights are {INT_DTYPES}")
    if self.dense not in DENSE_DTYPES:
      raise QuantError(
          f"dense_dtype={self.dense!r}: attention and shared experts are held as one of "
          f"{DENSE_DTYPES}; int4 is for the routed experts only")
    if self.group_size < 1:
      raise QuantError(f"group_size={self.group_size}: must be a positive integer")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Quant":
    return cls(**d)


def check(cfg: TextConfig, quant: Quant) -> None:
  """Fails early, naming the config field, when int4 groups do not tile the experts'
  input dims (hidden_size for gate/up, moe_intermediate_size for down)."""
  if quant.experts != "int4":
    return
  for field in ("hidden_size", "moe_intermediate_size"):
    if (dim := getattr(cfg, field)) % quant.group_size:
      raise QuantError(f"--group_size={quant.group_size} does not divide {field}={dim}, an "
                       "input dim of the routed experts; pick a divisor")


def rule(quant: Quant, role: str) -> tuple[str, int | None] | None:
  """(qtype, group size or None for per channel) of a tensor, or None: keep it as it is.

  role: "experts" (routed), "dense" (attention, shared experts, dense MLPs) or any
  other tensor ("embedding", "lm_head", "router", "norm"), which must stay unquantized.
  """
  if role == "experts":
    return quant.experts, quant.group_size if quant.experts == "int4" else None
  if role == "dense":
    return ("int8", None) if quant.dense == "int8" else None
  raise QuantError(f"the {role} stays in the activation dtype; only routed experts, "
                   "attention and shared/dense MLP weights are quantized")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a weight of logical shape [*S] is held: codes [*C] and a scale [*K] of C's rank.

  Per channel, C = S and K has size 1 on the input axes. Group-wise, the one input axis
  d is held split as (d / group, group) at `group_axis`, K having size 1 on the second:
  on TPU a reshape of int4 codes is a relayout XLA does not fuse (measured: x @ dequant(w)
  for a [4096, 8192] weight kept a 134 MB float32 copy with [D, F] codes, none with
  [D/g, g, F] ones), while merging the dequantized axes afterwards fuses into the dot.
  """

  codes: tuple[int, ...]
  scale: tuple[int, ...]
  group_axis: int | None = None


def layout(name: str, shape: Sequence[int], input_axes: Sequence[int],
           group: int | None) -> Layout:
  """The held layout of weight `name` [*shape] (see `Layout`)."""
  axes = {a % len(shape) for a in input_axes}
  if group is None:
    return Layout(tuple(shape), tuple(1 if i in axes else d for i, d in enumerate(shape)))
  if len(axes) != 1:
    raise QuantError(f"{name}: group-wise scales need one input axis, it has {sorted(axes)}")
  (axis,) = axes
  if shape[axis] % group:
    raise QuantError(f"--group_size={group} does not divide {name}'s input dim "
                     f"{shape[axis]} (axis {axis} of {tuple(shape)}); pick a divisor")
  split = (*shape[:axis], shape[axis] // group, group, *shape[axis + 1:])
  return Layout(split, tuple(1 if i == axis + 1 else d for i, d in enumerate(split)), axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntArray:
  """A weight as integer `codes` and float32 `scale` in a `Layout`, as the kernels take it.

  codes: [*C] int8 | int4; scale: [*K] float32. Indexing one leading axis (an expert id,
  or an array of them) selects from both, so `experts[e]` or `experts[ids]` pick experts
  without dequantizing the others.
  """

  codes: jax.Array
  scale: jax.Array
  group_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape (group axes merged)."""
    s, g = self.codes.shape, self.group_axis
    return s if g is None else (*s[:g], s[g] * s[g + 1], *s[g + 2:])

  def __getitem__(self, index) -> "IntArray":
    g = self.group_axis
    return IntArray(self.codes[index], self.scale[index],
                    None if g is None else g - 1 + jnp.ndim(index))

  def dequantize(self, dtype: jnp.dtype) -> jax.Array:
    """`dtype(float32(codes) · scale)` (qwix.dequantize), in the logical shape."""
    w = qwix.dequantize(qwix.QArray(self.codes, self.scale)).astype(dtype)
    return w.reshape(self.shape)

  def partition_spec(self, spec: jax.sharding.PartitionSpec) -> "IntArray":
    """Specs of codes and scale from the logical weight's `spec` (a prefix pytree)."""
    names = tuple(spec) + (None,) * (len(self.shape) - len(spec))
    if self.group_axis is not None:
      names = (*names[:self.group_axis + 1], None, *names[self.group_axis + 1:])
    return IntArray(jax.sharding.PartitionSpec(*names),
                    jax.sharding.PartitionSpec(*scale_axes(names, self.scale.shape)),
                    self.group_axis)


def quantize(name: str, w: jax.Array, input_axes: Sequence[int], qtype: str,
             group: int | None) -> IntArray:
  """Symmetric absmax quantization of `w` [*S] in float32 -> codes and scale (`layout`).

  qwix's arithmetic (`qwix.quantize`: scale = absmax / (qmax + 0.5), 1 for an all-zero
  group, codes = round-half-to-even(w / scale)), written with the divisions as the
  products XLA turns them into when it runs qwix op by op: absmax · float32(1 / (qmax +
  0.5)) and w · (1 / scale). Inside a larger jit XLA would otherwise simplify qwix's
  divisions differently and move codes sitting on a rounding boundary, so a model
  quantized eagerly, under `jit` or by the converter (checkpoint/quant.py) would not hold
  the same codes; products are rounded once, wherever they run.
  """
  held = layout(name, w.shape, input_axes, group)
  split = [d for c, k in zip(held.codes, held.scale) for d in (k, c // k)]
  grouped = w.astype(jnp.float32).reshape(split)
  qmax = jnp.iinfo(QTYPES[qtype]).max
  absmax = jnp.max(jnp.abs(grouped), axis=tuple(range(1, len(split), 2)), keepdims=True)
  scale = absmax * jnp.float32(1 / (qmax + 0.5))
  scale = jnp.where(scale < jnp.sqrt(jnp.finfo(jnp.float32).tiny), 1.0, scale)
  codes = jnp.clip(jnp.round(grouped * (1 / scale)), -qmax - 1, qmax)
  return IntArray(codes.astype(QTYPES[qtype]).reshape(held.codes), scale.reshape(held.scale),
                  held.group_axis)


def scale_axes(axes: Sequence[str | None], scale: Sequence[int]) -> tuple[str | None, ...]:
  """Logical axes of a scale: the codes', none where the scale has size 1 (so a
  per-channel scale is split with its channels and a group scale with its groups)."""
  return tuple(a if s > 1 else None for a, s in zip(axes, scale))


class QuantWeight(nnx.Module):
  """A weight held as integer `codes` plus float32 `scale`; `w[...]` dequantizes it.

  Stands in for an `nnx.Param` in the layers, which read it the same way; the routed
  expert kernels take the `IntArray` itself (`packed()`, via `fp8.packed`) and
  dequantize the experts they use.
  """

  def __init__(self, codes: nnx.Param, scale: nnx.Param, dtype: jnp.dtype,
               group_axis: int | None):
    self.codes = codes
    self.scale = scale
    self.dtype = jnp.dtype(dtype)  # the dequantized (= activation) dtype
    self.group_axis = group_axis

  def packed(self) -> IntArray:
    return IntArray(self.codes[...], self.scale[...], self.group_axis)

  def __getitem__(self, index) -> jax.Array:
    return self.packed().dequantize(self.dtype)[index]


def _replace(module: nnx.Module, names: dict[str, tuple[int, ...]], where: str,
             quant_rule: tuple[str, int | None]) -> None:
  qtype, group = quant_rule
  for name, input_axes in names.items():
    param = getattr(module, name)
    if not isinstance(param, nnx.Param):
      raise QuantError(f"{where}.{name} is already {type(param).__name__}; integer "
                       "weights are made from plain ones (not --weights_dtype=fp8)")
    value = param[...]
    q = quantize(f"{where}.{name}", value, input_axes, qtype, group)
    axes = param.get_metadata().get("out_sharding") or (None,) * value.ndim
    spec = q.partition_spec(jax.sharding.PartitionSpec(*axes))
    setattr(module, name, QuantWeight(
        nnx.Param(q.codes, out_sharding=tuple(spec.codes), eager_sharding=False),
        nnx.Param(q.scale, out_sharding=tuple(spec.scale), eager_sharding=False),
        value.dtype, q.group_axis))


def apply(model: nnx.Module, quant: Quant) -> nnx.Module:
  """Replaces, in place, the linears of `model` with integer `QuantWeight`s; returns it.

  Call it inside the function that builds the model (under `nnx.eval_shape` to get the
  abstract layout a checkpoint restores into, or under `jit` with output shardings), so
  the full-precision weights are only ever temporaries.
  """
  for path, module in list(nnx.iter_graph(model)):
    where = ".".join(map(str, path))
    if isinstance(module, RoutedExperts):
      _replace(module, _MLP_INPUT_AXES, where, rule(quant, "experts"))
    elif isinstance(module, MLP) and (r := rule(quant, "dense")):
      _replace(module, _MLP_INPUT_AXES, where, r)
    elif isinstance(module, MLA) and (r := rule(quant, "dense")):
      _replace(module, _MLA_INPUT_AXES, where, r)
  return model
