"""Decode and prefill speed: the paged Engine next to the contiguous latent cache and
transformers' generate, one run.

  python benchmarks/decode.py --json=decode.json

Bench config (issue #5): hidden 1024, 8 layers, 16 heads, q_lora 384, kv_lora 128,
rope 32, nope 32, v 64, 64 experts top-4 + 1 shared, expert width 256, vocab 32000,
float32; the same random weights are loaded into every side. Measured:
  * decode tokens/s at batch B = 1 and 8 (64-token prompts, 64 new tokens, greedy) of
    - `paged`: the Engine (paged latent cache and scheduler, `max_batch` = B, pages of 16,
      no prefix caching): `Engine.run` written out (submit, then `step()` until done), as
      B·63 / (time(64 new) - time(1 new)), so prefill cancels;
    - `paged_step`: the bare `PagedModel.decode` step of that Engine, 63 steps in a loop
      over prefilled pages, each step's tokens read back and fed in from the host as the
      Engine does, nothing scheduled: `paged / paged_step` is the host's scheduling share;
    - `contiguous`, the baseline: the cache the old Engine kept (`LatentCache`, one
      sequence per row): each prompt prefilled (`forward.prefill`, bucketed, attention
      chunk 256) and inserted, then one jitted `forward.decode_step` + greedy pick per
      token, the cache donated, the window the bucketed prompt + new tokens (128: the
      paged step's window too), each step's tokens read back; timed like `paged`.
      `paged / contiguous` is what paging costs decode (issue 23: within 5%);
    - `contiguous_loop`: the same steps under one `jax.lax.while_loop`, as the old
      `Engine.generate` ran them (the figures before the paged engine);
    - `paged_8_slots` (B=1 only): one request on an Engine of 8 slots, whose steps
      compute the decoding rows only, bucketed to a power of two (here 1): idle slots
      cost nothing;
    - `transformers`: `generate`, timed like `paged`.
    The step-by-step sides also time each decode step (the Engine's steps once every
    prompt has its first token): the ratio of median steps is a second estimate of
    paged ÷ contiguous, steadier on a loaded machine than the totals' best;
  * prefill of a 1024-token prompt (compiled; compile time reported apart): contiguous
    (`forward.prefill`, as the old `Engine.prefill`), the paged Engine's first token
    (`generate(prompt, 1)`: two chunks of max_num_batched_tokens=512), the bare
    `PagedModel.extend` of all 1024 tokens in one call, and transformers. Every side
    computes what a generation needs: the cache and the last position's logits
    (transformers' forward with `logits_to_keep=1`, as its `generate` does); its forward
    with all 1024 positions' logits is reported too, as `transformers_all_logits_s`;
  * rooflines on this machine: the decode steps' weight bytes (`summary.
    decode_weight_bytes`, for B sequences) ÷ step time ÷ the measured read bandwidth
    (jit'd sum of 512 MiB), and the prefill's matmul FLOPs (`summary.prefill_flops`) ÷
    time ÷ the measured float32 matmul rate (the best of a few large jit'd GEMMs). Both
    probes run in every round of the timings they scale, so they see the same machine.
    `bounds` turns them into the best tokens/s and prefill time the machine allows, and
    so the largest ratio to transformers any implementation could reach here.
Every time is the best of --repeats calls, all sides interleaved (`_best_seconds`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from flax import nnx
from transformers import Mistral4Config, Mistral4ForCausalLM

from smallfour import config as config_lib
from smallfour.config import formats as config_formats
from smallfour import summary
from smallfour.checkpoint import assemble, keymap
from smallfour.inference.engine import Engine
from smallfour.inference.requests import GREEDY
from smallfour.inference.sampling import SamplingRows
from smallfour.nn import moe_kernels
from smallfour.nn.decoder import Transformer

from decode_sides import Contiguous, paged_generate, paged_steps  # benchmarks/, beside this

_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (best of).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads (0: torch's default).")

PROMPT, NEW, LONG = 64, 64, 1024


def bench_hf_config() -> Mistral4Config:
  return Mistral4Config(
      vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=256,
      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
      n_routed_experts=64, num_experts_per_tok=4, kv_lora_rank=128, q_lora_rank=384,
      qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, n_group=1, topk_group=1,
      first_k_dense_replace=0, max_position_embeddings=8192 * 4,
      rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                           original_max_position_embeddings=8192, beta_fast=32.0,
                           beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                           llama_4_scaling_beta=0.1, partial_rotary_factor=0.5),
      eos_token_id=None, pad_token_id=0, bos_token_id=1)


def build_models():
  hf_cfg = bench_hf_config()
  hf_cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  hf = Mistral4ForCausalLM(hf_cfg).float().eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # unit-scale activations and decisive routing, as in the tests
    for name, p in hf.named_parameters():
      std = 1.0 if p.ndim == 1 or "embed" in name else 1 / p.shape[-1] ** 0.5
      p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if p.ndim == 1 else 0.0))
  cfg = config_formats.from_hf(hf_cfg.to_dict())
  ours = Transformer(cfg, rngs=nnx.Rngs(0))
  tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
  assemble.load_into(ours, [m for g in keymap.hf_maps(cfg) for m in g],
                     assemble.DictSource(tensors))
  return hf, ours, cfg


def _best_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """The fastest of `repeats` timed calls of each function, the functions interleaved.

  On a shared VM interference only ever adds time, so the minimum is the stable estimate
  of what code costs (as `timeit` recommends); medians here drifted by 1.5x between runs.
  Interleaving (one call of each per round) lets both sides see the same machine: timed
  one after the other, the ratio moved by up to 1.5x between runs when the VM slowed
  down in between. A short pause between calls lets torch's OpenMP workers stop spinning
  before the next side runs.
  """
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(0.05)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


def _progress(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def decode_tok_s(hf, engine: Engine, contiguous: Contiguous, prompts: np.ndarray,
                 repeats: int, read: Callable[[], object],
                 slots_engine: Engine | None = None) -> dict[str, float]:
  """Decode tokens/s of every side (see the module docstring): B·63 / (time(64 new) -
  time(1 new)), prefill cancelling, or 63 bare steps; and each side's decode steps' times.
  `read` (the bandwidth probe) runs in every round too, so the roofline sees this machine
  as the sides do."""
  ids = torch.as_tensor(prompts)

  def hf_run(n):
    with torch.no_grad():
      hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

  compile_s = {}
  for name, fn in (("paged", lambda: paged_generate(engine, prompts, NEW)),
                   ("contiguous", lambda: contiguous.generate(prompts, NEW)),
                   ("contiguous_loop", lambda: contiguous.generate(prompts, NEW, loop=True))):
    start = time.perf_counter()
    fn()  # compiles prefill (or prompt chunks), insert, first token and the step / loop
    compile_s[name] = time.perf_counter() - start
    _progress(f"B={len(prompts)} {name} compiled and run in {compile_s[name]:.1f} s")
  paged_generate(engine, prompts, 1)
  contiguous.generate(prompts, 1)
  same = np.array_equal(np.asarray(paged_generate(engine, prompts, NEW)),
                        contiguous.generate(prompts, NEW))
  bare = paged_steps(engine, prompts, NEW - 1)
  hf_run(2)  # warm-up
  steps = {"paged": [], "paged_step": [], "contiguous": [], "paged_8_slots": []}
  fns = {"paged_new": lambda: paged_generate(engine, prompts, NEW, steps["paged"]),
         "paged_one": lambda: paged_generate(engine, prompts, 1),
         "paged_step": lambda: bare(steps["paged_step"]),
         "contiguous_new": lambda: contiguous.generate(prompts, NEW,
                                                      steps=steps["contiguous"]),
         "contiguous_one": lambda: contiguous.generate(prompts, 1),
         "contiguous_loop_new": lambda: contiguous.generate(prompts, NEW, loop=True),
         "contiguous_loop_one": lambda: contiguous.generate(prompts, 1, loop=True),
         "hf_new": lambda: hf_run(NEW), "hf_one": lambda: hf_run(1), "read": read}
  if slots_engine is not None:
    paged_generate(slots_engine, prompts, NEW)
    fns["slots_new"] = lambda: paged_generate(slots_engine, prompts, NEW,
                                              steps["paged_8_slots"])
    fns["slots_one"] = lambda: paged_generate(slots_engine, prompts, 1)
  _progress(f"B={len(prompts)} timing {len(fns)} calls × {repeats}")
  t = _best_seconds(fns, repeats)
  b = prompts.shape[0]
  tokens = b * (NEW - 1)
  out = {"paged_tok_s": tokens / (t["paged_new"] - t["paged_one"]),
         "paged_step_tok_s": tokens / t["paged_step"],
         "contiguous_tok_s": tokens / (t["contiguous_new"] - t["contiguous_one"]),
         "contiguous_loop_tok_s": tokens / (t["contiguous_loop_new"]
                                            - t["contiguous_loop_one"]),
         "transformers_tok_s": tokens / (t["hf_new"] - t["hf_one"]),
         "read_s": t["read"], "paged_equals_contiguous": bool(same),
         **{f"{k}_compile_s": v for k, v in compile_s.items()}}
  if slots_engine is not None:
    out["paged_8_slots_tok_s"] = tokens / (t["slots_new"] - t["slots_one"])
  for side, times in steps.items():
    if times:
      out[f"{side}_step_ms_p10_p50"] = [float(np.percentile(times, q)) * 1e3 for q in (10, 50)]
      out[f"{side}_median_step_tok_s"] = b / float(np.median(times))
  return out


def prefill_seconds(hf, engine: Engine, contiguous: Contiguous, repeats: int
                    ) -> dict[str, float]:
  """The 1024-token prefill of every side; the matmul-rate probes run in every round."""
  gemms, gemm_flops = {}, {}
  for m, k, n in GEMMS:
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    gemms[f"gemm_{m}_{k}_{n}"] = lambda p=product, a=a, b=b: p(a, b).block_until_ready()
    gemm_flops[f"gemm_{m}_{k}_{n}"] = 2 * m * k * n
  prompt = np.random.default_rng(1).integers(2, engine.cfg.vocab_size, LONG)
  ids = torch.as_tensor(prompt[None])
  pm = engine.paged
  table = np.arange(LONG // engine.page_size, dtype=np.int32)
  held = [pm.zeros()]

  def hf_run(logits_to_keep: int):
    with torch.no_grad():
      hf(ids, use_cache=True, logits_to_keep=logits_to_keep)

  def extend():
    held[0], drawn, _ = pm.extend(held[0], prompt.astype(np.int32), 0, table,
                                  np.zeros(2, np.uint32), SamplingRows.of([GREEDY]))
    np.asarray(drawn)

  hf_run(1)
  compile_s = {}
  for name, fn in (("contiguous", lambda: jax.block_until_ready(contiguous.prefill(prompt))),
                   ("paged", lambda: paged_generate(engine, prompt[None], 1)),
                   ("paged_extend", extend)):
    start = time.perf_counter()
    fn()
    compile_s[f"{name}_compile_s"] = time.perf_counter() - start
  _progress("prefill compiled; timing")
  t = _best_seconds({"contiguous": lambda: jax.block_until_ready(contiguous.prefill(prompt)),
                     "paged": lambda: paged_generate(engine, prompt[None], 1),
                     "paged_extend": extend, "hf": lambda: hf_run(1),
                     "hf_all": lambda: hf_run(0), **gemms}, repeats)
  return {"contiguous_s": t["contiguous"], "paged_s": t["paged"],
          "matmul_flop_s": max(flops / t[name] for name, flops in gemm_flops.items()),
          "paged_extend_s": t["paged_extend"], "transformers_s": t["hf"],
          "transformers_all_logits_s": t["hf_all"], **compile_s}


GEMMS = ((1024, 1024, 4096), (2048, 1024, 1024), (1024, 4096, 1024))


def read_probe() -> tuple[Callable[[], object], int]:
  """A jit'd float32 reduction over 512 MiB and its bytes: the decode roofline's memory
  side (bytes ÷ its fastest time)."""
  x = jnp.ones((128, 1024, 1024), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return lambda: total(x).block_until_ready(), x.nbytes


DECODE_SIDES = (("contiguous", "contiguous (step per token)"),
                ("contiguous_loop", "contiguous (while_loop)"),
                ("paged", "paged Engine"), ("paged_step", "paged step (bare)"),
                ("paged_8_slots", "paged Engine, 8 slots"),
                ("transformers", "transformers"))
PREFILL_SIDES = (("contiguous", "contiguous"), ("paged", "paged Engine"),
                 ("paged_extend", "paged extend (bare)"), ("transformers", "transformers"))


def rooflines(results: dict, cfg: config_lib.TextConfig, bandwidth: float, flop_rate: float
              ) -> None:
  """Adds the roofline fractions and the machine's bounds (see the module docstring)."""
  bounds = results["bounds"] = {}
  for batch in (1, 8):
    r = results[f"b{batch}"]
    r["weight_bytes_per_step"] = summary.decode_weight_bytes(cfg, batch, 4)
    bound_tok_s = batch * bandwidth / r["weight_bytes_per_step"]
    for side, _ in DECODE_SIDES:
      if f"{side}_tok_s" in r:
        r[f"{side}_roofline"] = r[f"{side}_tok_s"] / bound_tok_s
        r[f"{side}_vs_contiguous"] = r[f"{side}_tok_s"] / r["contiguous_tok_s"]
      if f"{side}_median_step_tok_s" in r:
        r[f"{side}_median_step_vs_contiguous"] = (r[f"{side}_median_step_tok_s"]
                                                  / r["contiguous_median_step_tok_s"])
    results[f"roofline_fraction_b{batch}"] = r["paged_roofline"]
    results[f"paged_vs_contiguous_b{batch}"] = r["paged_vs_contiguous"]
    results[f"paged_vs_contiguous_median_step_b{batch}"] = r[
        "paged_median_step_vs_contiguous"]
    bounds[f"b{batch}_tok_s"] = bound_tok_s
    bounds[f"b{batch}_ratio"] = bound_tok_s / r["transformers_tok_s"]
  p = results["prefill_1024"]
  p["flops"] = summary.prefill_flops(cfg, LONG)
  for side, _ in PREFILL_SIDES:
    p[f"{side}_gflop_s"] = p["flops"] / p[f"{side}_s"] / 1e9
    p[f"{side}_roofline"] = p["flops"] / p[f"{side}_s"] / flop_rate
  results["roofline_fraction_prefill"] = p["paged_roofline"]
  bounds["prefill_1024_s"] = p["flops"] / flop_rate
  bounds["prefill_1024_ratio"] = p["transformers_s"] * flop_rate / p["flops"]


def print_table(results: dict) -> None:
  bounds = results["bounds"]
  print(f"backend {results['backend']}, torch threads {results['torch_threads']}, "
        f"read bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s, "
        f"float32 matmul {results['matmul_gflop_s']:.0f} GFLOP/s, "
        f"load average {results['load_average']}")
  print("| decode | tok/s | roofline | ÷ contiguous | step ms p10 / p50 | ÷ contiguous, "
        "median steps | ÷ transformers |")
  print("|---|---|---|---|---|---|---|")
  for batch in (1, 8):
    r = results[f"b{batch}"]
    for side, label in DECODE_SIDES:
      if f"{side}_tok_s" not in r:
        continue
      steps = ("", "")
      if f"{side}_step_ms_p10_p50" in r:
        steps = (" / ".join(f"{x:.1f}" for x in r[f"{side}_step_ms_p10_p50"]),
                 f"{r[f'{side}_median_step_vs_contiguous']:.3f}")
      print(f"| B={batch} {label} | {r[f'{side}_tok_s']:.1f} | {r[f'{side}_roofline']:.0%} "
            f"| {r[f'{side}_vs_contiguous']:.3f} | {steps[0]} | {steps[1]} "
            f"| {r[f'{side}_tok_s'] / r['transformers_tok_s']:.2f}× |")
  p = results["prefill_1024"]
  print("| prefill 1024 | s | roofline | ÷ contiguous | transformers ÷ |")
  print("|---|---|---|---|---|")
  for side, label in PREFILL_SIDES:
    print(f"| {label} | {p[f'{side}_s']:.3f} | {p[f'{side}_roofline']:.0%} "
          f"| {p['contiguous_s'] / p[f'{side}_s']:.3f} "
          f"| {p['transformers_s'] / p[f'{side}_s']:.2f}× |")
  print(f"transformers prefill with all 1024 positions' logits: "
        f"{p['transformers_all_logits_s']:.3f} s")
  for batch in (1, 8):
    r = results[f"b{batch}"]
    print(f"B={batch}: paged = contiguous token for token: {r['paged_equals_contiguous']}; "
          f"compile s: paged {r['paged_compile_s']:.1f}, contiguous "
          f"{r['contiguous_compile_s']:.1f}, loop {r['contiguous_loop_compile_s']:.1f}; "
          f"MoE kernel {r['moe_kernel']}")
  print(f"roofline: weight bytes per step {results['b1']['weight_bytes_per_step'] / 2**20:.0f}"
        f" MiB (B=1), {results['b8']['weight_bytes_per_step'] / 2**20:.0f} MiB (B=8); "
        f"prefill {p['flops'] / 1e9:.1f} GFLOP. Bounds: decode {bounds['b1_tok_s']:.1f} / "
        f"{bounds['b8_tok_s']:.1f} tok/s (B=1 / 8), at most {bounds['b1_ratio']:.2f}× / "
        f"{bounds['b8_ratio']:.2f}× transformers; prefill {bounds['prefill_1024_s']:.3f} s")


def main(argv):
  del argv
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  load = os.getloadavg()
  hf, ours, cfg = build_models()
  _progress("models built")
  contiguous = Contiguous(ours, max_len=2048)
  engines = {b: Engine(ours, max_len=2048, max_batch=b, prefix_caching=False)
             for b in (1, 8)}
  rng = np.random.default_rng(0)
  results = {"config": "bench (issue 5)", "backend": jax.default_backend(),
             "torch_threads": torch.get_num_threads()}
  read, read_bytes = read_probe()
  for batch in (1, 8):
    prompts = rng.integers(2, cfg.vocab_size, (batch, PROMPT))
    results[f"b{batch}"] = decode_tok_s(hf, engines[batch], contiguous, prompts,
                                        _REPEATS.value, read, engines[8] if batch == 1 else None)
    results[f"b{batch}"]["moe_kernel"] = moe_kernels.select_kernel(batch, jax.default_backend())
  results["prefill_1024"] = prefill_seconds(hf, engines[8], contiguous, _REPEATS.value)
  results["prefill_1024"]["moe_kernel"] = moe_kernels.select_kernel(LONG, jax.default_backend())
  bandwidth = read_bytes / min(results[f"b{b}"]["read_s"] for b in (1, 8))
  flop_rate = results["prefill_1024"]["matmul_flop_s"]
  results["read_bandwidth_gb_s"] = bandwidth / 1e9
  results["matmul_gflop_s"] = flop_rate / 1e9
  results["load_average"] = " → ".join(f"{x:.1f}" for x in (load[0], os.getloadavg()[0]))
  rooflines(results, cfg, bandwidth, flop_rate)
  print_table(results)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
