"""A serving plan: does a config fit a target, and how fast could its steps go there.

For a TPU topology the real decode step (B sequences over a T-token cache) and prefill
(one S-token prompt) are compiled from abstract inputs for its devices (`Engine.lower_*`
on a mesh of libtpu's abstract devices), and XLA:TPU's own figures are reported next to
the counts from shapes; for a GPU (no compiler here) only the counts exist, and the
report says so. All byte figures are per device.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from smallfour import sharding
from smallfour.config import TextConfig
from smallfour.inference.engine import Engine
from smallfour.nn.decoder import Transformer
from smallfour.nn import quant
from smallfour.nn.quant import WEIGHTS_DTYPES
from smallfour.plan import compiled as compiled_lib
from smallfour.plan import counts, hardware, hlo

CACHE_DTYPE = jnp.bfloat16  # the activation (and cache) dtype of a served model


def default_mesh(target: hardware.Target) -> dict[str, int]:
  """Every device on the expert axis: weights split, nothing replicated but attention."""
  return {"data": 1, "expert": target.count, "tensor": 1}


def _step(analysis: dict[str, Any] | None, count: dict[str, Any], tokens: int,
          seconds_floor: float) -> dict[str, Any]:
  """One step's entry: compiler figures (when compiled), counts, ratio and ceiling."""
  out: dict[str, Any] = {
      "compiled": None,
      "counted": {"weights_bytes": count["weights_bytes"], "cache_bytes": count["cache_bytes"]},
      "bytes_accessed": None, "flops": None,
      "unavoidable_bytes": count["unavoidable_bytes"],
      "ceiling_tokens_per_s": tokens / seconds_floor,
  }
  if analysis is not None:
    out.update({k: analysis[k] for k in ("compiled", "bytes_accessed", "flops")
                if k in analysis})
    if "out_of_memory" in analysis:  # and how long XLA took to say so
      out["out_of_memory"] = analysis["out_of_memory"]
      out["compile_seconds"] = round(analysis["compile_seconds"], 1)
    if out["bytes_accessed"]:
      out["bytes_accessed_ratio"] = out["bytes_accessed"] / count["unavoidable_bytes"]
  return out


def make_plan(cfg: TextConfig, target_name: str, *, mesh: dict[str, int] | None = None,
              weights_dtype: str = "bfloat16", batch: int = 8, max_len: int = 32768,
              prefill_len: int | None = None, hlo_dir: str | None = None,
              group_size: int = quant.DEFAULT_GROUP_SIZE,
              dense_dtype: str = "bfloat16") -> dict[str, Any]:
  """The plan of serving `cfg` on `target_name` (see module docstring) as a JSON-able dict.

  `prefill_len` defaults to `max_len` (the longest prompt the cache holds); `hlo_dir`
  receives each compiled step's optimized HLO (`<step>.hlo`) and the source lines whose
  ops move the most bytes in it (`<step>_bytes_by_line.json`, see hlo.py). `group_size`,
  `dense_dtype`: int8/int4 weights as the converter's flags of those names make them.
  """
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f"weights_dtype={weights_dtype!r}; expected one of {WEIGHTS_DTYPES}")
  prefill_len = prefill_len or max_len
  gpus = None if mesh is None else mesh["data"] * mesh["expert"] * mesh["tensor"]
  target = hardware.resolve(target_name, gpus or 1)
  sizes = mesh or default_mesh(target)
  itemsize = jnp.dtype(CACHE_DTYPE).itemsize

  def make():
    model = Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=CACHE_DTYPE,
                        fp8=weights_dtype == "fp8")
    return (quant.apply(model, quant.Quant(weights_dtype, group_size, dense_dtype))
            if weights_dtype in quant.INT_DTYPES else model)

  model = nnx.eval_shape(make)
  count = counts.counted(cfg, nnx.state(model, nnx.Param), sizes, batch=batch,
                         max_len=max_len, prefill_len=prefill_len, itemsize=itemsize)
  analyses: dict[str, Any] = {"decode": None, "prefill": None}
  if target.compiled:
    device_mesh = sharding.make_mesh(sizes, cfg, devices=list(target.devices))
    engine = Engine(model, max_len=max_len, mesh=device_mesh)
    analyses = {"decode": compiled_lib.analyze(engine.lower_step(batch)),
                "prefill": compiled_lib.analyze(engine.lower_prefill(prefill_len))}
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      for step, analysis in analyses.items():
        if "hlo" in analysis:
          with open(os.path.join(hlo_dir, f"{step}.hlo"), "w") as f:
            f.write(analysis["hlo"])
          with open(os.path.join(hlo_dir, f"{step}_bytes_by_line.json"), "w") as f:
            json.dump(hlo.top_ops(analysis["hlo"], 40), f, indent=1)
  integer = ({"group_size": group_size, "dense_dtype": dense_dtype}
             if weights_dtype in quant.INT_DTYPES else {})
  return assemble(target, sizes, count, analyses, weights_dtype=weights_dtype, **integer,
                  batch=batch, max_len=max_len, prefill_len=prefill_len)


def assemble(target: hardware.Target, sizes: dict[str, int], count: dict[str, Any],
             analyses: dict[str, Any], **request: Any) -> dict[str, Any]:
  """The plan from the counts (`counts.counted`) and the compiler's analyses (None for
  a GPU): per-step figures, ceilings and the fit. `request`: weights_dtype, batch,
  max_len, prefill_len."""
  batch, prefill_len = request["batch"], request["prefill_len"]
  decode_seconds = count["decode"]["unavoidable_bytes"] / target.bandwidth
  prefill_seconds = max(count["prefill"]["unavoidable_bytes"] / target.bandwidth,
                        count["prefill"]["flops"] / target.flops)
  report: dict[str, Any] = {
      "target": target.name,
      "chip": target.chip.name,
      "devices": target.count,
      "mesh": sizes,
      **request,
      "source": ("compiled by XLA:TPU (libtpu) for abstract devices; counts from shapes"
                 if target.compiled else
                 "arithmetic from shapes (no GPU compiler here): weights and cache only, "
                 "no activations or runtime reserve"),
      "hbm_bytes_per_device": target.chip.hbm_bytes,
      "vision_weights_bytes": count["vision_bytes"],
      "decode": _step(analyses["decode"], count["decode"], batch, decode_seconds),
      "prefill": _step(analyses["prefill"], count["prefill"], prefill_len, prefill_seconds),
  }
  report.update(_fit(report, target))
  return report


def _fit(report: dict[str, Any], target: hardware.Target) -> dict[str, Any]:
  """`fits`, and `headroom_bytes` (free at the peak of the larger step) or
  `missing_bytes`; the compiler decides for TPUs, weights + cache for GPUs. The vision
  encoder's weights, held beside every step, count on top."""
  hbm, held = target.chip.hbm_bytes, report["vision_weights_bytes"]
  steps = [report["decode"], report["prefill"]]
  if not target.compiled:
    need = max(s["counted"]["weights_bytes"] + s["counted"]["cache_bytes"] for s in steps)
  elif any(s["compiled"] is None for s in steps):
    missing = max(s["out_of_memory"]["needed_bytes"] - s["out_of_memory"]["available_bytes"]
                  for s in steps if s["compiled"] is None)
    return {"fits": False, "missing_bytes": missing + held}
  else:
    need = max(compiled_lib.peak_bytes(s["compiled"]) for s in steps)
  need += held
  if need > hbm:
    return {"fits": False, "missing_bytes": need - hbm}
  return {"fits": True, "headroom_bytes": hbm - need}
