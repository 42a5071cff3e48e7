"""A serving plan: does a config fit a target, and how fast could its steps go there.

For a TPU topology the engine's real passes over its page pool are compiled from abstract
inputs for its devices (`PagedModel.lower_decode` / `lower_extend` on a mesh of libtpu's
abstract devices): the decode step of B sequences, each attending over a T-token window,
and one prompt chunk (a step's token budget) whose cache reaches the prompt's length, as
chunked prefill runs it; XLA:TPU's own figures are reported next to the counts from
shapes. For a GPU (no compiler here) only the counts exist, and the report says so.

The pool (`cache_tokens` tokens, default B × T, in pages of `page_size`, + the sink page)
is held whole by every device, so `context_tokens_that_fit` (the cached tokens a pool in
what the weights and the larger step's other buffers leave free could hold) is a figure
per device and for the whole mesh at once. All byte figures are per device.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from smallfour import sharding
from smallfour.config import TextConfig
from smallfour.inference.paged import PagedModel
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
      "counted": {"weights_bytes": count["weights_bytes"], "cache_bytes": count["cache_bytes"],
                  "window_bytes": count["window_bytes"]},
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
              prefill_len: int | None = None, cache_tokens: int | None = None,
              page_size: int = 16, max_num_batched_tokens: int = 512,
              probe: bool = True, hlo_dir: str | None = None,
              group_size: int = quant.DEFAULT_GROUP_SIZE,
              dense_dtype: str = "bfloat16") -> dict[str, Any]:
  """The plan of serving `cfg` on `target_name` (see module docstring) as a JSON-able dict.

  `batch` sequences of up to `max_len` tokens each decode together; `cache_tokens`
  (default batch × max_len), `page_size`, `max_num_batched_tokens`: the engine's flags of
  those names. `prefill_len` (default `max_len`) is the prompt whose last chunk is
  compiled. `probe` (TPU): compile both steps again over a pool of half the pages, so
  that what a cached token costs each step (the pool, and any temporaries that grow with
  it) is measured rather than assumed (doubles the compile time). `hlo_dir` receives
  each compiled step's optimized HLO (`<step>.hlo`) and the source lines whose ops move
  the most bytes in it (`<step>_bytes_by_line.json`, see hlo.py). `group_size`, `dense_dtype`: int8/int4 weights as the converter's flags of
  those names make them.
  """
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f"weights_dtype={weights_dtype!r}; expected one of {WEIGHTS_DTYPES}")
  prefill_len = prefill_len or max_len
  cache_tokens = batch * max_len if cache_tokens is None else cache_tokens
  check_engine_sizes(batch=batch, max_len=max_len, prefill_len=prefill_len,
                     cache_tokens=cache_tokens, page_size=page_size,
                     max_num_batched_tokens=max_num_batched_tokens)
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
                         max_len=max_len, prefill_len=prefill_len, itemsize=itemsize,
                         cache_tokens=cache_tokens, page_size=page_size,
                         max_num_batched_tokens=max_num_batched_tokens)
  analyses: dict[str, Any] = {"decode": None, "prefill": None}
  probes: dict[str, Any] | None = None
  if target.compiled:
    device_mesh = sharding.make_mesh(sizes, cfg, devices=list(target.devices))

    def compile_steps(pages: int) -> dict[str, Any]:
      paged = PagedModel(model, num_pages=pages, page_size=page_size, mesh=device_mesh)
      return {"decode": compiled_lib.analyze(paged.lower_decode(batch, window=max_len)),
              "prefill": compiled_lib.analyze(paged.lower_extend(count["chunk_padded"],
                                                                 window=prefill_len))}

    pages = count["pool"]["pages"]
    analyses = compile_steps(pages)
    if probe:
      half = pages // 2 if pages > 1 else 2
      probes = {"pages": half,
                "bytes": counts.pool_bytes(cfg, sizes, half, page_size, itemsize),
                **{step: {k: v for k, v in a.items() if k != "hlo"}
                   for step, a in compile_steps(half).items()}}
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
  return assemble(target, sizes, count, analyses, probes, weights_dtype=weights_dtype,
                  **integer, batch=batch, max_len=max_len, prefill_len=prefill_len,
                  cache_tokens=cache_tokens, page_size=page_size,
                  max_num_batched_tokens=max_num_batched_tokens)


class SizeError(ValueError):
  """Sizes the serving engine would refuse (a usage error of the plan command)."""


def check_engine_sizes(*, batch: int, max_len: int, prefill_len: int, cache_tokens: int,
                       page_size: int, max_num_batched_tokens: int) -> None:
  """Raises SizeError for sizes the engine refuses (`Engine`, `Scheduler`)."""
  if min(batch, max_len, prefill_len, cache_tokens, page_size, max_num_batched_tokens) < 1:
    raise SizeError("batch, max_len, prefill_len, cache_tokens, page_size and "
                    "max_num_batched_tokens must be positive")
  if page_size & (page_size - 1) or cache_tokens < page_size:
    raise SizeError(f"page_size must be a power of two and at most cache_tokens "
                    f"({cache_tokens}), got {page_size}")
  if max_num_batched_tokens < page_size:
    raise SizeError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                    f"the page size ({page_size}): chunks are whole pages")
  if prefill_len > max_len:
    raise SizeError(f"prefill_len ({prefill_len}) is longer than a sequence (max_len "
                    f"{max_len})")


def assemble(target: hardware.Target, sizes: dict[str, int], count: dict[str, Any],
             analyses: dict[str, Any], probes: dict[str, Any] | None = None,
             **request: Any) -> dict[str, Any]:
  """The plan from the counts (`counts.counted`) and the compiler's analyses (None for
  a GPU; `probes`: those of the same steps over a smaller pool, `pages` and `bytes`, or
  None): per-step figures, ceilings, the fit and the context that fits. `request`:
  weights_dtype, batch, max_len, prefill_len, cache_tokens, page_size,
  max_num_batched_tokens (and group_size, dense_dtype for integer weights)."""
  batch, chunk = request["batch"], count["chunk_tokens"]
  decode_seconds = count["decode"]["unavoidable_bytes"] / target.bandwidth
  prefill_seconds = max(count["prefill"]["unavoidable_bytes"] / target.bandwidth,
                        count["prefill"]["flops"] / target.flops)
  pool = count["pool"]
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
      "pool": {"pages": pool["pages"], "tokens": pool["pages"] * pool["page_size"],
               "bytes": pool["bytes"], "bytes_per_token": pool["token_bytes"],
               "replicated": True},
      "prefill_chunk_tokens": chunk,
      "decode": _step(analyses["decode"], count["decode"], batch, decode_seconds),
      "prefill": _step(analyses["prefill"], count["prefill"], chunk, prefill_seconds),
  }
  report.update(_fit(report, target))
  report["context_probe_pages"] = None if probes is None else probes["pages"]
  for name in ("decode", "prefill"):
    report[name].update(_pool_cost(report, name, target, probes))
  report["context_tokens_that_fit"] = _context(report, target)
  report["summary"] = _summary(report)
  return report


def _fit(report: dict[str, Any], target: hardware.Target) -> dict[str, Any]:
  """`fits`, and `headroom_bytes` (free at the peak of the larger step) or
  `missing_bytes`; the compiler decides for TPUs, weights + pool for GPUs. The vision
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


def _need(step: dict[str, Any] | None) -> float:
  """The device bytes a compiled step needs at its peak, or that XLA said it needed."""
  if step is None:
    return float("nan")
  if step["compiled"] is not None:
    return compiled_lib.peak_bytes(step["compiled"])
  return step["out_of_memory"]["needed_bytes"]


def _pool_cost(report: dict[str, Any], name: str, target: hardware.Target,
               probes: dict[str, Any] | None) -> dict[str, Any]:
  """What a cached token costs the step and what it holds beside the pool:
  `cached_token_bytes` and `bytes_beside_pool` (a line through its peak at this pool and,
  with `probes`, at the smaller one; without, the pool counted once). A token costs at
  least its own bytes: a small pool's padding (XLA:TPU may pad the page axis to 128) can
  hide its growth. The vision weights are not in them."""
  pool, step = report["pool"], report[name]
  if not target.compiled:
    return {"cached_token_bytes": pool["bytes_per_token"],
            "bytes_beside_pool": step["counted"]["weights_bytes"]}
  need = _need(step)
  if probes is not None and need == need and _need(probes[name]) == _need(probes[name]):
    slope = max(1.0, (need - _need(probes[name])) / (pool["bytes"] - probes["bytes"]))
  else:
    slope = 1.0
  return {"cached_token_bytes": slope * pool["bytes_per_token"],
          "bytes_beside_pool": need - slope * pool["bytes"]}


def _context(report: dict[str, Any], target: hardware.Target) -> int | None:
  """Cached tokens the largest pool that fits would hold: for each step, what is left
  beside its `bytes_beside_pool` and the vision weights, at its `cached_token_bytes`;
  the smaller of the two. Whole pages, one of them the sink. From out-of-memory messages
  (figures rounded to 0.01 of their unit, "38.19G") it is good to about 0.1%. None when
  XLA gave no figures."""
  fits = []
  for step in (report["decode"], report["prefill"]):
    beside, per_token = step["bytes_beside_pool"], step["cached_token_bytes"]
    if beside != beside or per_token != per_token:  # NaN: XLA's message had no figures
      return None
    free = target.chip.hbm_bytes - report["vision_weights_bytes"] - beside
    fits.append(counts.context_tokens(free, per_token, report["page_size"]))
  return min(fits)


def _summary(report: dict[str, Any]) -> str:
  """One line: the fit, the pool, and the context that fits."""
  gb = lambda x: f"{x / 1e9:.1f} GB"  # noqa: E731
  pool = report["pool"]
  fit = (f"fits, {gb(report['headroom_bytes'])} free per device" if report["fits"] else
         f"does not fit, {gb(report['missing_bytes'])} short per device")
  context = report["context_tokens_that_fit"]
  return (f"{fit}; page pool of {pool['tokens']:,} tokens ({pool['pages']:,} pages of "
          f"{report['page_size']} + the sink: {gb(pool['bytes'])} on every device); "
          + ("context that fits beside the weights: unknown" if context is None else
             f"context that fits beside the weights: {context:,} tokens "
             f"({context / report['max_len']:.1f} sequences of {report['max_len']:,})"))
