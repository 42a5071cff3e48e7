"""Decode and prefill speed: smallfour's Engine next to transformers' generate, one run.

  python benchmarks/decode.py --json=decode.json

Bench config (issue #5): hidden 1024, 8 layers, 16 heads, q_lora 384, kv_lora 128,
rope 32, nope 32, v 64, 64 experts top-4 + 1 shared, expert width 256, vocab 32000,
float32; the same random weights are loaded into both. Measured:
  * decode tokens/s at batch 1 and 8 (64-token prompts, 64 new tokens, greedy), as
    63 / (time(64 new) - time(1 new)), so prefill is excluded on both sides;
  * prefill time of a 1024-token prompt (compiled; compile time reported apart). Both
    sides compute what a generation needs: the cache and the last position's logits
    (transformers' forward with `logits_to_keep=1`, as its `generate` does); its forward
    with all 1024 positions' logits is reported too, as `transformers_all_logits_s`;
  * rooflines on this machine: the decode steps' weight bytes (`summary.
    decode_weight_bytes`) ÷ step time ÷ the measured read bandwidth (jit'd sum of
    512 MiB), and the prefill's matmul FLOPs (`summary.prefill_flops`) ÷ time ÷ the
    measured float32 matmul rate (the best of a few large jit'd GEMMs). `bounds` turns
    them into the best tokens/s and prefill time the machine allows, and so the largest
    ratio to transformers any implementation could reach here.
Every time is the best of --repeats calls, the two sides interleaved (`_best_seconds`).
"""

from __future__ import annotations

import json
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
from smallfour.nn import moe_kernels
from smallfour.nn.decoder import Transformer

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


def decode_tok_s(hf, engine: Engine, prompts: np.ndarray, repeats: int) -> dict[str, float]:
  """Decode tokens/s of both sides as B·63 / (time(64 new) - time(1 new)): prefill cancels."""
  ids, batch = torch.as_tensor(prompts), [list(p) for p in prompts]

  def hf_run(n):
    with torch.no_grad():
      hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

  start = time.perf_counter()
  engine.generate(batch, NEW)  # compiles prefill, insert, first-token and the loop
  compile_s = time.perf_counter() - start
  engine.generate(batch, 1)
  hf_run(2)  # warm-up
  t = _best_seconds({"ours_new": lambda: engine.generate(batch, NEW),
                     "ours_one": lambda: engine.generate(batch, 1),
                     "hf_new": lambda: hf_run(NEW), "hf_one": lambda: hf_run(1)}, repeats)
  tokens = prompts.shape[0] * (NEW - 1)
  return {"smallfour_tok_s": tokens / (t["ours_new"] - t["ours_one"]),
          "transformers_tok_s": tokens / (t["hf_new"] - t["hf_one"]),
          "smallfour_compile_s": compile_s}


def prefill_seconds(hf, engine: Engine, repeats: int) -> dict[str, float]:
  prompt = np.random.default_rng(1).integers(2, 32000, LONG)
  ids = torch.as_tensor(prompt[None])

  def hf_run(logits_to_keep: int):
    with torch.no_grad():
      hf(ids, use_cache=True, logits_to_keep=logits_to_keep)

  hf_run(1)
  start = time.perf_counter()
  jax.block_until_ready(engine.prefill(list(prompt)))
  compile_s = time.perf_counter() - start
  t = _best_seconds({"ours": lambda: jax.block_until_ready(engine.prefill(list(prompt))),
                     "hf": lambda: hf_run(1), "hf_all": lambda: hf_run(0)}, repeats)
  return {"smallfour_s": t["ours"], "transformers_s": t["hf"],
          "transformers_all_logits_s": t["hf_all"], "smallfour_compile_s": compile_s}


def read_bandwidth() -> float:
  """Bytes/s of a jit'd float32 reduction over 512 MiB: the decode roofline's memory side."""
  x = jnp.ones((128, 1024, 1024), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return x.nbytes / _best_seconds({"sum": lambda: total(x).block_until_ready()}, 5)["sum"]


def matmul_rate() -> float:
  """FLOP/s of the fastest of a few large jit'd float32 GEMMs: the prefill roofline."""
  best = 0.0
  for m, k, n in ((1024, 1024, 4096), (2048, 1024, 1024), (1024, 4096, 1024)):
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    seconds = _best_seconds({"gemm": lambda: product(a, b).block_until_ready()}, 5)["gemm"]
    best = max(best, 2 * m * k * n / seconds)
  return best


def rooflines(results: dict, cfg: config_lib.TextConfig, bandwidth: float, flop_rate: float
              ) -> None:
  """Adds the roofline fractions and the machine's bounds (see the module docstring)."""
  bounds = results["bounds"] = {}
  for batch in (1, 8):
    r = results[f"b{batch}"]
    r["weight_bytes_per_step"] = summary.decode_weight_bytes(cfg, batch, 4)
    bound_tok_s = batch * bandwidth / r["weight_bytes_per_step"]
    results[f"roofline_fraction_b{batch}"] = r["smallfour_tok_s"] / bound_tok_s
    bounds[f"b{batch}_tok_s"] = bound_tok_s
    bounds[f"b{batch}_ratio"] = bound_tok_s / r["transformers_tok_s"]
  p = results["prefill_1024"]
  p["flops"] = summary.prefill_flops(cfg, LONG)
  p["smallfour_gflop_s"] = p["flops"] / p["smallfour_s"] / 1e9
  p["transformers_gflop_s"] = p["flops"] / p["transformers_s"] / 1e9
  results["roofline_fraction_prefill"] = p["flops"] / p["smallfour_s"] / flop_rate
  bounds["prefill_1024_s"] = p["flops"] / flop_rate
  bounds["prefill_1024_ratio"] = p["transformers_s"] * flop_rate / p["flops"]


def print_table(results: dict) -> None:
  bounds = results["bounds"]
  print(f"backend {results['backend']}, torch threads {results['torch_threads']}, "
        f"read bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s, "
        f"float32 matmul {results['matmul_gflop_s']:.0f} GFLOP/s")
  print(f"{'':<22}{'smallfour':>11}{'transformers':>14}{'ratio':>8}{'roofline':>10}"
        f"{'ratio bound':>13}  kernel")
  for batch in (1, 8):
    r = results[f"b{batch}"]
    print(f"{f'decode B={batch} tok/s':<22}{r['smallfour_tok_s']:>11.1f}"
          f"{r['transformers_tok_s']:>14.1f}"
          f"{r['smallfour_tok_s'] / r['transformers_tok_s']:>7.2f}x"
          f"{results[f'roofline_fraction_b{batch}']:>10.0%}"
          f"{bounds[f'b{batch}_ratio']:>12.2f}x  {r['moe_kernel']}")
  p = results["prefill_1024"]
  print(f"{'prefill 1024 s':<22}{p['smallfour_s']:>11.3f}{p['transformers_s']:>14.3f}"
        f"{p['transformers_s'] / p['smallfour_s']:>7.2f}x"
        f"{results['roofline_fraction_prefill']:>10.0%}"
        f"{bounds['prefill_1024_ratio']:>12.2f}x  {p['moe_kernel']}")
  print(f"transformers prefill with all 1024 positions' logits: "
        f"{p['transformers_all_logits_s']:.3f} s")
  print(f"compile s: decode B=1 {results['b1']['smallfour_compile_s']:.1f}, "
        f"B=8 {results['b8']['smallfour_compile_s']:.1f}, prefill {p['smallfour_compile_s']:.1f}")
  print(f"roofline: weight bytes per step {results['b1']['weight_bytes_per_step'] / 2**20:.0f}"
        f" MiB (B=1), {results['b8']['weight_bytes_per_step'] / 2**20:.0f} MiB (B=8); "
        f"prefill {p['flops'] / 1e9:.1f} GFLOP. 'ratio bound': the largest ratio this "
        f"machine allows (roofline speed / transformers)")


def main(argv):
  del argv
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  hf, ours, cfg = build_models()
  engine = Engine(ours, max_len=2048, prefill_chunk=256)
  rng = np.random.default_rng(0)
  results = {"config": "bench (issue 5)", "backend": jax.default_backend(),
             "torch_threads": torch.get_num_threads()}
  for batch in (1, 8):
    prompts = rng.integers(2, 32000, (batch, PROMPT))
    results[f"b{batch}"] = decode_tok_s(hf, engine, prompts, _REPEATS.value)
    results[f"b{batch}"]["moe_kernel"] = moe_kernels.select_kernel(batch, jax.default_backend())
  results["prefill_1024"] = prefill_seconds(hf, engine, _REPEATS.value)
  results["prefill_1024"]["moe_kernel"] = moe_kernels.select_kernel(LONG, jax.default_backend())
  bandwidth, flop_rate = read_bandwidth(), matmul_rate()
  results["read_bandwidth_gb_s"] = bandwidth / 1e9
  results["matmul_gflop_s"] = flop_rate / 1e9
  rooflines(results, cfg, bandwidth, flop_rate)
  print_table(results)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
