"""Serving plans (`launch/info.py --plan`): the engine's paged decode step and prompt chunk
compiled for an abstract TPU topology by libtpu and checked against counts from shapes made
here independently (the page pool whole on every device); GPU plans on paper."""

import json
import os
import subprocess
import sys

import pytest

from smallfour import configs, summary
from smallfour.plan import compiled, hardware, hlo
from smallfour.plan import report as plan_lib
from tests import launch_many

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_KEYS = {"compiled", "counted", "bytes_accessed", "flops", "unavoidable_bytes",
             "ceiling_tokens_per_s"}


def tiny():
  return configs.resolve("tiny")


def vision_params(cfg) -> int:
  """Parameters of the vision encoder, if the model has one (held, never a text step's)."""
  return sum(v.size for path, v in summary.abstract_flat(cfg).items() if path[0] == "vision")


def pool_rows(pages):
  """The pool's pages: + the sink, rounded up to whole TPU tiles (paged.pool_shape)."""
  return -(-(pages + 1) // 32) * 32


def expected_counts(cfg, experts_axis, batch, max_len, weight_bytes=2, cache_tokens=None,
                    page_size=16):
  """Per-device weights, page pool and decode unavoidable bytes with every device on the
  expert axis, from the parameter counts alone (bf16 cache)."""
  counts = summary.param_counts(cfg)
  routed = counts["routed_expert_params"]
  text = counts["total_params"] - vision_params(cfg)
  weights = weight_bytes * (text - routed + routed // experts_axis)
  token = 2 * cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # all layers
  pages = (cache_tokens or batch * max_len) // page_size
  pool = token * pool_rows(pages) * page_size  # whole on every device
  window = token * batch * max_len // experts_axis  # each device reads its sequences'
  local = cfg.num_experts // experts_axis
  used = local * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch)
  unavoidable = (weight_bytes * (text - routed - counts["embedding_params"])
                 + 2 * batch * cfg.hidden_size + used / local * weight_bytes * routed
                 // experts_axis + window)
  return weights, pool, window, unavoidable


def test_tpu_plan_compiles_and_agrees_with_shapes(tmp_path):
  cfg, batch, max_len = tiny(), 4, 256
  plan = plan_lib.make_plan(cfg, "v5e:2x2", batch=batch, max_len=max_len, prefill_len=64,
                            hlo_dir=str(tmp_path), probe=False)
  assert plan["mesh"] == {"data": 1, "expert": 4, "tensor": 1}
  assert plan["chip"] == "TPU v5e" and plan["devices"] == 4
  assert (plan["cache_tokens"], plan["page_size"], plan["max_num_batched_tokens"]) == (
      batch * max_len, 16, 512)
  assert plan["prefill_chunk_tokens"] == 64  # the whole (short) prompt is one chunk
  weights, pool, window, unavoidable = expected_counts(cfg, 4, batch, max_len)
  assert plan["pool"] == {"pages": batch * max_len // 16, "tokens": batch * max_len,
                          "bytes": pool, "bytes_per_token": 2 * cfg.num_layers * (
                              cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                          "replicated": True}
  decode, prefill = plan["decode"], plan["prefill"]
  assert STEP_KEYS <= set(decode) and STEP_KEYS <= set(prefill)
  assert set(decode["compiled"]) == {"argument_bytes", "temp_bytes", "output_bytes",
                                     "alias_bytes", "compile_seconds"}
  assert decode["counted"] == {"weights_bytes": weights, "cache_bytes": pool,
                               "window_bytes": window}
  assert decode["unavoidable_bytes"] == pytest.approx(unavoidable)
  # Both steps take the weights and the whole pool (+ tokens, page table, keys, sampling),
  # and update the donated pool in place.
  for step in (decode, prefill):
    assert step["counted"]["cache_bytes"] == pool
    assert step["compiled"]["argument_bytes"] == pytest.approx(weights + pool, rel=0.02)
    assert step["compiled"]["alias_bytes"] >= pool
    assert step["bytes_accessed"] > 0 and step["flops"] > 0
    # Not measured (probe=False): a cached token costs a step its own bytes.
    assert step["cached_token_bytes"] == plan["pool"]["bytes_per_token"]
  assert plan["context_probe_pages"] is None
  assert plan["fits"] is True
  peak = max(compiled.peak_bytes(s["compiled"]) for s in (decode, prefill))
  assert plan["vision_weights_bytes"] == 2 * vision_params(cfg)
  assert plan["headroom_bytes"] == pytest.approx(hardware.TPU_CHIPS["TPU v5 lite"].hbm_bytes
                                                 - peak - plan["vision_weights_bytes"])
  # The context that fits: far more than this pool, in whole pages.
  context = plan["context_tokens_that_fit"]
  assert context % 16 == 0 and context > 100 * plan["cache_tokens"]
  assert f"{context:,} tokens" in plan["summary"]
  assert decode["ceiling_tokens_per_s"] == pytest.approx(batch * 0.819e12 / unavoidable)
  json.dumps(plan)  # all of it is JSON
  # Where the decode step's bytes go, by source line: the LM head (the tiny model's
  # largest weight, held whole by every device) is read a vocab slice per device
  # (forward.next_logits), and the lines account for the step.
  lines = json.loads((tmp_path / "decode_bytes_by_line.json").read_text())
  head = next(r for r in lines if r["where"].startswith("nn/decoder.py"))
  head_bytes = 2 * cfg.hidden_size * cfg.vocab_size
  assert head_bytes / 4 <= head["bytes"] < head_bytes / 3
  assert sum(r["bytes"] for r in lines) <= decode["bytes_accessed"]
  assert (tmp_path / "prefill.hlo").exists()


def test_fp8_tpu_plan_holds_the_codes():
  """FP8-resident on a TPU topology: the compiled steps take the e4m3 codes and their
  scales (no bf16 copy among the arguments), as counted here from the abstract tree."""
  cfg, batch, max_len = tiny(), 4, 256
  plan = plan_lib.make_plan(cfg, "v5e:2x2", batch=batch, max_len=max_len, prefill_len=64,
                            weights_dtype="fp8", probe=False)
  flat = summary.abstract_flat(cfg, fp8=True)
  weights = sum(v.size * v.dtype.itemsize // (4 if "experts" in p and p[-3] == "experts"
                                               else 1)
                for p, v in flat.items() if p[0] != "vision")
  _, pool, window, _ = expected_counts(cfg, 4, batch, max_len)
  decode, prefill = plan["decode"], plan["prefill"]
  assert decode["counted"] == {"weights_bytes": weights, "cache_bytes": pool,
                               "window_bytes": window}
  assert decode["compiled"]["argument_bytes"] == pytest.approx(weights + pool, rel=0.02)
  assert prefill["compiled"]["argument_bytes"] == pytest.approx(weights + pool, rel=0.02)
  bf16_weights, _, _, _ = expected_counts(cfg, 4, batch, max_len)
  assert weights < bf16_weights  # (the tiny model is mostly its bf16 embedding and head)
  assert plan["fits"] is True


def test_a_pool_that_does_not_fit_says_what_would():
  """A pool of 2^27 tokens is 19 GB on every v5e device (16.9 GB): XLA:TPU refuses to
  compile, and the plan says by how much it misses and, from the same steps over half the
  pool, what a cached token costs each (more than its own bytes: the steps hold copies of
  the pool) and how many tokens would fit. A pool of that many fits, to the rounding of
  XLA's out-of-memory figures ("38.19G"), with next to nothing to spare."""
  cfg = tiny()
  plan = plan_lib.make_plan(cfg, "v5e:2x2", batch=4, max_len=256, prefill_len=64,
                            cache_tokens=2**27)
  assert plan["fits"] is False and plan["context_probe_pages"] == 2**27 // 16 // 2
  assert plan["decode"]["compiled"] is None and plan["decode"]["compile_seconds"] > 0
  oom = plan["decode"]["out_of_memory"]
  assert oom["needed_bytes"] > oom["available_bytes"] == pytest.approx(15.75 * 2**30)
  assert plan["missing_bytes"] >= oom["needed_bytes"] - oom["available_bytes"]
  token = plan["pool"]["bytes_per_token"]
  assert all(plan[s]["cached_token_bytes"] > token for s in ("decode", "prefill"))
  context = plan["context_tokens_that_fit"]
  assert 0 < context < 2**27 and context % 16 == 0
  fitted = plan_lib.make_plan(cfg, "v5e:2x2", batch=4, max_len=256, prefill_len=64,
                              cache_tokens=context, probe=False)
  hbm = fitted["hbm_bytes_per_device"]
  assert fitted.get("headroom_bytes", 0) < 0.01 * hbm, fitted["summary"]
  assert fitted.get("missing_bytes", 0) < 0.001 * hbm, fitted["summary"]


_HLO = """HloModule m

%relayout (p: f8e4m3fn[16,64,32]) -> f8e4m3fn[16,64,32] {
  %p = f8e4m3fn[16,64,32]{2,1,0:T(32,128)(4,1)} parameter(0)
  ROOT %c = f8e4m3fn[16,64,32]{2,1,0:T(8,128)(4,1)} copy(%p)
}

%fused (a: f8e4m3fn[16,64,32], i: s32[]) -> bf16[1,64,32] {
  %a = f8e4m3fn[16,64,32]{2,1,0} parameter(0)
  %r = f8e4m3fn[16,64,32]{2,1,0} fusion(%a), kind=kLoop, calls=%relayout
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %s = f8e4m3fn[1,64,32]{2,1,0} dynamic-slice(%r, %i, %z, %z), dynamic_slice_sizes={1,64,32}
  ROOT %v = bf16[1,64,32]{2,1,0} convert(%s)
}

ENTRY %main (w: f8e4m3fn[16,64,32], i: s32[], x: s8[4096]) -> bf16[1,64,32] {
  %w = f8e4m3fn[16,64,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = s8[4096]{0} parameter(2)
  %ss = ((s8[4096]{0}), s8[1024]{0:S(1)}, s32[]{:S(2)}) slice-start(%x), slice={[0:1024]}
  %sd = s8[1024]{0:S(1)} slice-done(%ss)
  ROOT %f = bf16[1,64,32]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused
}
"""


def test_hlo_bytes_of_slices():
  """hlo.top_ops counts what XLA:TPU's fusions and async slices move: an expert sliced
  out of FP8 codes that are first relayouted (a nested copy fusion) reads the slice, not
  all experts; an async slice into on-chip memory moves the slice, its done half nothing."""
  rows = {r["where"].split(" ")[0]: r["bytes"] for r in hlo.top_ops(_HLO)}
  assert rows == {"fusion": 64 * 32 + 4 + 2 * 64 * 32, "slice-start": 2 * 1024}


def test_out_of_memory_messages():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (34.20G) exceeds available HBM (31.25G).")
  assert compiled.out_of_memory(message) == {"needed_bytes": 34.2 * 2**30,
                                             "available_bytes": 31.25 * 2**30}
  assert compiled.out_of_memory("Used 100.5G of 95.74G hbm. Exceeded by 4.76G. "
                                "RESOURCE_EXHAUSTED")["needed_bytes"] == 100.5 * 2**30
  assert compiled.out_of_memory("INVALID_ARGUMENT: something else") is None


def test_gpu_plan_is_arithmetic():
  cfg = tiny()
  plan = plan_lib.make_plan(cfg, "h100", mesh={"data": 1, "expert": 2, "tensor": 1},
                            batch=2, max_len=128, weights_dtype="fp8")
  assert plan["devices"] == 2 and "arithmetic" in plan["source"]
  assert plan["decode"]["compiled"] is None and plan["decode"]["bytes_accessed"] is None
  # FP8-resident: one byte per code, four per scale, the rest bf16.
  flat = summary.abstract_flat(cfg, fp8=True)
  per_device = sum(v.size * v.dtype.itemsize // (2 if "experts" in p and p[-3] == "experts"
                                                   else 1)
                   for p, v in flat.items() if p[0] != "vision")
  assert plan["decode"]["counted"]["weights_bytes"] == per_device
  assert plan["fits"] is True
  huge = plan_lib.make_plan(cfg, "h100", batch=1, max_len=2**30)
  _, pool, _, _ = expected_counts(cfg, 1, 1, 2**30)
  weights = huge["decode"]["counted"]["weights_bytes"]
  assert huge["decode"]["counted"]["cache_bytes"] == pool
  hbm = hardware.GPU_CHIPS["h100"].hbm_bytes
  assert huge["fits"] is False
  assert huge["missing_bytes"] == weights + pool + huge["vision_weights_bytes"] - hbm
  # On paper the pool is all that grows: whole pages of what the weights leave, less the sink.
  token = huge["pool"]["bytes_per_token"]
  free = hbm - weights - huge["vision_weights_bytes"]
  assert huge["context_tokens_that_fit"] == (int(free // (16 * token)) // 32 * 32 - 1) * 16
  # The pool is whole on every device: more GPUs hold more weights' room, not more pool.
  two = plan_lib.make_plan(cfg, "h100", mesh={"data": 1, "expert": 2, "tensor": 1},
                           batch=1, max_len=2**30, cache_tokens=2**20, page_size=64,
                           max_num_batched_tokens=256)
  assert two["pool"] == {"pages": 2**14, "tokens": 2**20, "bytes": token * 64 * pool_rows(2**14),
                         "bytes_per_token": token, "replicated": True}
  assert two["prefill_chunk_tokens"] == 256
  with pytest.raises(plan_lib.SizeError, match="power of two"):
    plan_lib.make_plan(cfg, "h100", batch=1, max_len=64, page_size=12)
  with pytest.raises(plan_lib.SizeError, match="at least the page size"):
    plan_lib.make_plan(cfg, "h100", batch=1, max_len=64, max_num_batched_tokens=8)


def test_info_cli_plan(tmp_path):
  """Three runs in one interpreter (tests/launch_many.py), the TPU plan first: its stderr
  is checked as a fresh process's (jax probes for the absent TPU on the first compile)."""
  tpu, out, bad = launch_many.run("info.py", [
      ["--config=tiny", "--plan", "--target=v5e:2x2", "--batch=2", "--max_len=64",
       "--prefill_len=32", "--noprobe"],
      ["--config=tiny", "--plan", "--target=h200", "--max_len=64",
       f"--json={tmp_path / 'plan.json'}"],
      ["--config=tiny", "--plan", "--target=v9z:1x1"]], timeout=300)
  assert out.returncode == 0, out.stderr
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan == json.loads(out.stdout)
  assert {"fits", "hbm_bytes_per_device", "decode", "prefill", "pool",
          "context_tokens_that_fit", "summary"} <= set(plan)
  assert bad.returncode != 0 and "neither a GPU" in bad.stderr
  # A TPU plan's output is the JSON alone: jax's INFO line about the absent TPU (it
  # probes on the first compile) is shown only with --verbosity.
  assert tpu.returncode == 0 and tpu.stderr == "", tpu.stderr
  assert json.loads(tpu.stdout)["fits"] is True


def test_libtpu_is_quiet_on_a_host_without_tpus():
  """With libtpu installed (the test extra), a plain start on a CPU (or GPU) host prints
  nothing from it: smallfour gives it the settings it would otherwise look for."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")}
  out = subprocess.run([sys.executable, "-c", "import smallfour, jax; print(jax.devices())"],
                       capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr
  assert "TPU" not in out.stderr, out.stderr
