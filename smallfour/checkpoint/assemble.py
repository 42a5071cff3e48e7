"""Fills a model's parameter state from checkpoint tensors through a key map."""

from __future__ import annotations

from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour.checkpoint.keymap import Path, TensorMap


class CheckpointError(ValueError):
  """A checkpoint does not match the model it is loaded into."""


def build_params(maps: Iterable[TensorMap], read: Callable[[str], np.ndarray],
                 abstract: nnx.State) -> dict[Path, np.ndarray]:
  """Builds each mapped parameter, checked against the shape `abstract` expects.

  `read(name)` returns one checkpoint tensor (dequantized); `abstract` is the model's
  (possibly abstract) parameter state. Returns {path: array in the parameter dtype}.
  """
  expected = dict(nnx.to_flat_state(abstract))
  out = {}
  for m in maps:
    if m.path not in expected:
      raise CheckpointError(f"key map targets {'.'.join(map(str, m.path))}, which the model lacks")
    inputs = [read(name) for name in m.sources]
    for name, x, shape in zip(m.sources, inputs, m.shapes):
      if tuple(x.shape) != shape:
        raise CheckpointError(f"tensor {name} has shape {tuple(x.shape)}, expected {shape}")
    arr, want = m.build(*inputs), expected[m.path]
    if tuple(arr.shape) != tuple(want.shape):  # a key map bug, not a checkpoint problem
      raise AssertionError(f"{m.sources} -> {m.path}: {arr.shape} != {want.shape}")
    out[m.path] = np.asarray(arr, dtype=want.dtype)
  return out


def load_into(model: nnx.Module, maps: Iterable[TensorMap],
              read: Callable[[str], np.ndarray]) -> None:
  """Replaces every parameter of `model` with checkpoint tensors; all must be mapped."""
  state = nnx.state(model, nnx.Param)
  built = build_params(maps, read, state)
  flat = nnx.to_flat_state(state)
  missing = [p for p, _ in flat if p not in built]
  if missing:
    names = ", ".join(".".join(map(str, p)) for p in missing[:5])
    raise CheckpointError(f"{len(missing)} parameters have no checkpoint tensor, e.g. {names}")
  for path, var in flat:
    var.set_value(jnp.asarray(built[path]))
  nnx.update(model, state)
