"""Builds our parameters from checkpoint tensors through a key map."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Iterable, Mapping, Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour.checkpoint import fp8, quant, strided
from smallfour.checkpoint.keymap import Path, TensorMap
from smallfour.checkpoint.layout import CheckpointError


class TensorSource(Protocol):
  """Named checkpoint tensors, dequantized on read."""

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's full shape (raises CheckpointError if absent)."""

  def read(self, name: str, index: int | None = None, dtype=np.float32) -> np.ndarray:
    """`tensor` or `tensor[index]`, dequantized and cast to `dtype`; read-only."""


class DictSource:
  """A TensorSource over in-memory arrays (e.g. a torch state_dict as numpy)."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self.tensors = tensors

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self.tensors:
      raise CheckpointError(f"missing tensor {name}")
    return tuple(self.tensors[name].shape)

  def read(self, name: str, index: int | None = None, dtype=np.float32) -> np.ndarray:
    x = self.tensors[name] if index is None else self.tensors[name][index]
    return np.asarray(x, dtype)


def check_shapes(maps: Iterable[TensorMap], source: TensorSource) -> None:
  """Every source tensor exists with the shape the key map expects; nothing is read."""
  for m in maps:
    for name, want in zip(m.sources, m.shapes):
      if (got := source.shape(name)) != want:
        raise CheckpointError(f"tensor {name} has shape {got}, expected {want}")


def build_params(maps: Iterable[TensorMap], source: TensorSource,
                 abstract: nnx.State | Mapping[Path, Any],
                 empty: Callable[..., np.ndarray] = np.empty,
                 executor: concurrent.futures.Executor | None = None) -> dict[Path, np.ndarray]:
  """Builds the mapped parameters in the dtype `abstract` (the model's state) gives them.

  Args:
    abstract: the model's state, or its flat form {path: variable or ShapeDtypeStruct}
      (pass the flat form when calling repeatedly: flattening costs ~ms per call).
    empty: allocates the outputs, `empty(shape, dtype)` (e.g. from reused buffers).
    executor: builds expert slices in parallel (numpy releases the GIL); else in order.

  Expert slices (`write_index`) fill one preallocated array, so the transient memory is
  one expert's copy (per thread), not a whole stacked tensor. A source with
  `read_lookup` (FP8) hands over codes and a value table: the build rearranges the codes
  and the table fills the output in one pass; with `read_transient`, slices are read
  into a reused buffer, as they are copied out at once. An FP8-resident target (the
  model has `path + ("codes",)` and `path + ("scale",)`) gets the rearranged codes and
  their multiplier as stored, from the source's `read_fp8`; an integer target (int8 or
  int4 codes) is quantized from the float32 values (`checkpoint/quant.py`), each expert
  slice on its own.
  Returns {path: C-contiguous array}.
  """
  maps = list(maps)
  check_shapes(maps, source)
  expected = abstract if not isinstance(abstract, nnx.State) else dict(
      nnx.to_flat_state(abstract))
  for m in maps:
    if m.path not in expected and _codes(m.path) not in expected:
      raise AssertionError(f"key map targets {m.path}, which the model lacks")
  lookup = getattr(source, "read_lookup", None)
  transient = getattr(source, "read_transient", None)
  out: dict[Path, np.ndarray] = {}

  def build_fp8(m: TensorMap) -> None:
    """Puts `m`'s codes and multiplier into `out` (whole, or the slice `write_index`)."""
    read = getattr(source, "read_fp8", None)
    stored = read(m.sources[0], m.read_index) if read and len(m.sources) == 1 else None
    if stored is None:
      raise CheckpointError(f"tensor {m.sources[0]} is not FP8 with one multiplier; "
                            "FP8-resident weights are built from an FP8 checkpoint only")
    codes, scale = stored
    value = m.build(codes)
    var = expected[_codes(m.path)]
    shape = tuple(var.shape if m.write_index is None else var.shape[1:])
    if tuple(value.shape) != shape:
      raise AssertionError(f"{m.sources} -> {m.path}: {value.shape} != {shape}")
    if m.write_index is None:
      out[_codes(m.path)] = empty(shape, np.dtype(var.dtype))
      out[_scale(m.path)] = np.array(scale[0], np.float32)
      dst = out[_codes(m.path)]
    else:
      dst = out[_codes(m.path)][m.write_index]
      out[_scale(m.path)][m.write_index] = scale[0]
    strided.copy_into(dst.view(np.uint8), value)

  def build_int(m: TensorMap) -> None:
    """Quantizes `m`'s float32 values into `out`'s codes and scale (whole, or a slice)."""
    var, scale_var = expected[_codes(m.path)], expected[_scale(m.path)]
    cut = slice(None) if m.write_index is None else slice(1, None)
    shape, scale_shape = tuple(var.shape[cut]), tuple(scale_var.shape[cut])
    value = m.build(*[source.read(name, m.read_index, np.float32) for name in m.sources])
    if value.size != np.prod(shape):
      raise AssertionError(f"{m.sources} -> {m.path}: {value.shape} does not fill {shape}")
    value = value.reshape(shape)  # group-wise codes hold their groups as an axis
    if m.write_index is None:
      out[_codes(m.path)], out[_scale(m.path)] = quant.quantize(
          value, scale_shape, var.dtype, empty(shape, np.dtype(var.dtype)))
    else:
      _, out[_scale(m.path)][m.write_index] = quant.quantize(
          value, scale_shape, var.dtype, out[_codes(m.path)][m.write_index])

  def build(m: TensorMap) -> np.ndarray | None:
    """Builds `m`; returns the whole parameter, or None once it (or its slice) is in `out`."""
    if m.path not in expected:
      integer = quant.is_integer_codes(expected[_codes(m.path)].dtype)
      return build_int(m) if integer else build_fp8(m)
    var = expected[m.path]
    shape = tuple(var.shape if m.write_index is None else var.shape[1:])
    coded = lookup(m.sources[0], m.read_index, var.dtype) if (
        lookup and len(m.sources) == 1) else None
    raw = transient(m.sources[0], m.read_index, var.dtype) if (
        coded is None and transient and m.write_index is not None and len(m.sources) == 1
    ) else None
    if coded is not None:
      codes, table = coded
      value = m.build(codes)
    elif raw is not None:
      value = m.build(raw)
    else:
      value = m.build(*[source.read(name, m.read_index, var.dtype) for name in m.sources])
    if tuple(value.shape) != shape:  # a key-map bug, not a checkpoint problem
      raise AssertionError(f"{m.sources} -> {m.path}: {value.shape} != {shape}")
    if m.write_index is None:
      dst = empty(shape, np.dtype(var.dtype)) if coded is not None else None
    else:
      dst = out[m.path][m.write_index]
    if coded is not None:
      fp8.lookup_into(dst, table, value)
    elif dst is None:
      dst = strided.contiguous(value, empty)  # often a transposed view: copied once
    else:
      strided.copy_into(dst, value)
    return dst if m.write_index is None else None

  for m in maps:
    if m.write_index is not None:
      for path in (m.path, _codes(m.path), _scale(m.path)):
        if path in expected and path not in out:
          out[path] = empty(tuple(expected[path].shape), np.dtype(expected[path].dtype))
  for m in maps:
    if m.write_index is None and (value := build(m)) is not None:
      out[m.path] = value
  slices = [m for m in maps if m.write_index is not None]
  for _ in (executor.map(build, slices) if executor else map(build, slices)):
    pass  # re-raises the first error
  return out


def _codes(path: Path) -> Path:
  return path + ("codes",)


def _scale(path: Path) -> Path:
  return path + ("scale",)


def load_into(model: nnx.Module, maps: Iterable[TensorMap], source: TensorSource) -> None:
  """Replaces every parameter of `model` with checkpoint tensors; all must be mapped."""
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  built = build_params(maps, source, dict(flat))
  missing = [p for p, _ in flat if p not in built]
  if missing:
    names = ", ".join(".".join(map(str, p)) for p in missing[:5])
    raise CheckpointError(f"{len(missing)} parameters have no checkpoint tensor, e.g. {names}")
  for path, var in flat:
    var.set_value(jnp.asarray(built[path]))
  nnx.update(model, state)
