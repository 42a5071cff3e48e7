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
from smallfour.checkpoint import tree
from smallfour.checkpoint.layout import (FORMAT_VERSION, PARAMS_DIR, STAGING_SUFFIX,
                                         STORED_DTYPES, CheckpointError)
from smallfour.nn.decoder import Transformer
from smallfour.nn.fp8 import WEIGHTS_DTYPES


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


def restore_model(ckpt_dir: str, mesh: jax.sharding.Mesh | None = None,
                  dtype: str | None = None, weights_dtype: str | None = None) -> Transformer:
  """Builds the model abstractly and fills it from `ckpt_dir`.

  Args:
    mesh: parameters are placed by the logical-axis rule table on this mesh; default, the
      first device (plain, mesh-free arrays).
    dtype: the parameter (= activation) dtype; default, the dtype the checkpoint stores
      (bfloat16 for an fp8 one). FP8-resident weights are dequantized to it where used.
    weights_dtype: "fp8" keeps the e4m3 linears of an fp8 checkpoint (`--dtype=fp8` in
      the converter) FP8-resident, codes and scales as stored; default, what the
      checkpoint stores. Dequantize on conversion instead to get plain weights.
  """
  meta = read_metadata(ckpt_dir)
  cfg = config_lib.TextConfig.from_dict(meta["text"])
  stored = meta["param_dtype"]
  weights_dtype = weights_dtype or ("fp8" if stored == "fp8" else "bfloat16")
  if weights_dtype not in WEIGHTS_DTYPES:
    raise CheckpointError(f"weights_dtype={weights_dtype!r}; expected one of {WEIGHTS_DTYPES}")
  if (weights_dtype == "fp8") != (stored == "fp8"):
    raise CheckpointError(
        f"{ckpt_dir} stores {stored} weights, so weights_dtype={weights_dtype!r} cannot be "
        "restored from it: convert the FP8 release with --dtype=fp8 for FP8-resident "
        "weights, or with --dtype=bfloat16 for plain ones")
  param_dtype = jnp.dtype(dtype or STORED_DTYPES[stored])
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                             fp8=weights_dtype == "fp8"))
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  if mesh is None:
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placement = {path: one_device for path, _ in flat}
  else:
    placement = {path: var.get_value()
                 for path, var in nnx.to_flat_state(sharding.named_shardings(state, mesh))}
  target = tree.nest({
      path: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=placement[path])
      for path, var in flat})
  try:
    loaded = ocp.load(os.path.join(ckpt_dir, PARAMS_DIR), target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{ckpt_dir}: parameters do not match its config ({e})") from None
  for path, var in flat:
    var.set_value(tree.lookup(loaded, path))
  nnx.update(model, state)
  return model
