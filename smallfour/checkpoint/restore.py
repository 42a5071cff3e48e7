"""Restores a converted checkpoint, straight into `NamedSharding` targets on a mesh.

Orbax reads, on each process, only the shards its devices hold. Without a mesh the
parameters land on one device.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from smallfour import config as config_lib
from smallfour import sharding
from smallfour.checkpoint import quant as ckpt_quant
from smallfour.checkpoint import tree
from smallfour.checkpoint.layout import (FORMAT_VERSION, PARAMS_DIR, STAGING_SUFFIX,
                                         STORED_DTYPES, CheckpointError)
from smallfour.nn import quant as quant_lib
from smallfour.nn.decoder import Transformer
from smallfour.nn.quant import WEIGHTS_DTYPES


def read_metadata(ckpt_dir: str) -> dict[str, Any]:
  """The checkpoint's smallfour_config.json, with a clear error if it is not one."""
  file = os.path.join(ckpt_dir, config_lib.SMALLFOUR_CONFIG_FILE)
  if not os.path.exists(file):
    if os.path.exists(ckpt_dir.rstrip("/") + STAGING_SUFFIX):
      raise CheckpointError(f"{ckpt_dir}: the conversion into it did not finish; rerun it")
    raise CheckpointError(f"{ckpt_dir} is not a converted smallfour checkpoint (no {file})")
  with open(file) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(
        f"{ckpt_dir} was converted with format_version {meta.get('format_version')}; this "
        f"smallfour reads {FORMAT_VERSION} (the parameter layout changed): convert it again")
  return meta


def read_config(ckpt_dir: str) -> config_lib.TextConfig:
  """The model config a converted checkpoint holds."""
  return config_lib.TextConfig.from_dict(read_metadata(ckpt_dir)["text"])


def read_quant(ckpt_dir: str, meta: dict[str, Any], group_size: int | None = None,
               dense_dtype: str | None = None) -> quant_lib.Quant | None:
  """How an int8/int4 checkpoint was quantized; the caller's group size and dense dtype,
  when given, must be what it stores (codes cannot be regrouped without the weights)."""
  if meta["param_dtype"] not in quant_lib.INT_DTYPES:
    return None
  q = quant_lib.Quant.from_dict(meta["quant"])
  if q.experts == "int4" and group_size is not None and group_size != q.group_size:
    raise CheckpointError(
        f"{ckpt_dir} was quantized with --group_size={q.group_size}, not {group_size}: "
        f"restore it with {q.group_size} (the default), or convert the release again with "
        f"--group_size={group_size}")
  if dense_dtype is not None and dense_dtype != q.dense:
    raise CheckpointError(
        f"{ckpt_dir} holds attention and shared experts as {q.dense}, not {dense_dtype}: "
        f"convert the release again with --dense_dtype={dense_dtype}")
  return q


def restore_model(ckpt_dir: str, mesh: jax.sharding.Mesh | None = None,
                  dtype: str | None = None, weights_dtype: str | None = None,
                  group_size: int | None = None, dense_dtype: str | None = None
                  ) -> Transformer:
  """Builds the model abstractly and fills it from `ckpt_dir`.

  Args:
    mesh: parameters are placed by the logical-axis rule table on this mesh; default, the
      first device (plain, mesh-free arrays).
    dtype: the parameter (= activation) dtype; default, the dtype the checkpoint stores
      (bfloat16 for an fp8 one). FP8-resident weights are dequantized to it where used.
    weights_dtype: "fp8" keeps the e4m3 linears of an fp8 checkpoint (`--dtype=fp8` in
      the converter) FP8-resident, codes and scales as stored; default, what the
      checkpoint stores. Dequantize on conversion instead to get plain weights. "int8" /
      "int4": the integer weights of a checkpoint converted with that --dtype (nn/quant.py).
    group_size, dense_dtype: for int8/int4, checked against what the checkpoint stores.
  """
  meta = read_metadata(ckpt_dir)
  cfg = config_lib.TextConfig.from_dict(meta["text"])
  stored = meta["param_dtype"]
  weights_dtype = weights_dtype or (
      stored if stored in ("fp8", *quant_lib.INT_DTYPES) else "bfloat16")
  if weights_dtype not in WEIGHTS_DTYPES:
    raise CheckpointError(f"weights_dtype={weights_dtype!r}; expected one of {WEIGHTS_DTYPES}")
  if (weights_dtype in quant_lib.INT_DTYPES or stored in quant_lib.INT_DTYPES) and (
      weights_dtype != stored):
    raise CheckpointError(
        f"{ckpt_dir} stores {stored} weights, so weights_dtype={weights_dtype!r} cannot be "
        f"restored from it: convert the release with --dtype={weights_dtype}")
  quant = read_quant(ckpt_dir, meta, group_size, dense_dtype)
  if (weights_dtype == "fp8") != (stored == "fp8"):
    raise CheckpointError(
        f"{ckpt_dir} stores {stored} weights, so weights_dtype={weights_dtype!r} cannot be "
        "restored from it: convert the FP8 release with --dtype=fp8 for FP8-resident "
        "weights, or with --dtype=bfloat16 for plain ones")
  param_dtype = jnp.dtype(dtype or STORED_DTYPES[stored])

  def make():
    model = Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                        fp8=weights_dtype == "fp8")
    return model if quant is None else quant_lib.apply(model, quant)

  model = nnx.eval_shape(make)
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  if mesh is None:
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placement = {path: one_device for path, _ in flat}
  else:
    placement = {path: var.get_value()
                 for path, var in nnx.to_flat_state(sharding.named_shardings(state, mesh))}
  # int4 codes are stored two to a byte (checkpoint/quant.py) and unpacked where they land.
  int4 = {path for path, var in flat if var.dtype == ckpt_quant.INT4}
  target = tree.nest({
      path: jax.ShapeDtypeStruct(
          ckpt_quant.packed_shape(var.shape, ".".join(map(str, path))) if path in int4
          else var.shape, jnp.uint8 if path in int4 else var.dtype, sharding=placement[path])
      for path, var in flat})
  try:
    loaded = ocp.load(os.path.join(ckpt_dir, PARAMS_DIR), target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{ckpt_dir}: parameters do not match its config ({e})") from None
  for path, var in flat:
    value = tree.lookup(loaded, path)
    if path in int4:
      value = jax.jit(ckpt_quant.unpack_int4, out_shardings=placement[path])(value)
    var.set_value(value)
  nnx.update(model, state)
  return model
