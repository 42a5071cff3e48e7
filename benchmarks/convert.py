"""Converter throughput and peak memory, next to a plain copy of the same bytes.

  python benchmarks/convert.py                 # both sources, default sizes
  python benchmarks/convert.py --json=out.json

Writes a synthetic released checkpoint (random data, real tensor names and shapes, one
shard per layer) for a config whose decoder layers are >= 50 MB (8 layers by default, so
that fixed start-up costs weigh about as little as on the 36-layer model), then measures
in a fresh child process:
  * conversion time and throughput (source GB/s) vs `shutil.copyfile` of the same shards,
    both straight into the page cache and followed by `os.sync()` (data on disk). The
    converter fsyncs its output before its commit rename, so its own time already
    includes the disk; copy+sync is the like-for-like baseline;
  * peak RSS, absolute and above the process's baseline after imports, against the bytes
    of one converted decoder layer (goal: <= 2.5x; throughput goal: >= 50% of the copy).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

from smallfour.config import formats as config_formats
from smallfour.checkpoint import keymap
from smallfour.config import RopeConfig, TextConfig

_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers.")
_EXPERTS = flags.DEFINE_integer("experts", 32, "Routed experts.")
_WIDTH = flags.DEFINE_integer("expert_width", 1024, "Expert hidden width.")
_SOURCES = flags.DEFINE_list("sources", ["native_fp8", "hf_bf16"], "Source kinds to measure.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temp dir).")


def bench_config() -> TextConfig:
  return TextConfig(
      vocab_size=32000, hidden_size=1024, num_layers=_LAYERS.value, num_heads=16,
      q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
      v_head_dim=64, num_experts=_EXPERTS.value, num_experts_per_tok=4, n_shared_experts=1,
      moe_intermediate_size=_WIDTH.value, intermediate_size=4096,
      rope=RopeConfig(original_max_position_embeddings=4096,
                      llama_4_original_max_position_embeddings=4096),
      max_position_embeddings=131072)


def _random(shape, fp8: bool, rng: np.random.Generator) -> np.ndarray:
  if fp8:  # any byte but the two NaN codes (0x7f, 0xff): positive finite e4m3 values
    return rng.integers(0, 0x7F, shape, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  # bf16 bit patterns of magnitudes ~[2^-8, 2): plausible weights, no inf/nan
  return rng.integers(0x3B80, 0x4000, shape, dtype=np.uint16).view(ml_dtypes.bfloat16)


def write_source(directory: str, cfg: TextConfig, kind: str) -> int:
  """Writes a synthetic checkpoint; returns its bytes."""
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  native = kind == "native_fp8"
  groups = list(keymap.native_maps(cfg) if native else keymap.hf_maps(cfg))
  weight_map = {}
  for i, group in enumerate(groups):
    tensors = {}
    for m in group:
      for name, shape in zip(m.sources, m.shapes):
        if name in tensors:
          continue
        quantize = native and len(shape) >= 2 and not name.endswith(
            ("gate.weight", "tok_embeddings.weight", "output.weight"))
        tensors[name] = _random(shape, quantize, rng)
        if quantize:
          base = name[:-len("weight")]
          tensors[base + "qscale_weight"] = np.array(0.01, np.float32)
          tensors[base + "qscale_act"] = np.array(0.1, np.float32)
    shard = f"{'consolidated' if native else 'model'}-{i:05d}-of-{len(groups):05d}.safetensors"
    save_file(tensors, os.path.join(directory, shard))
    weight_map.update({name: shard for name in tensors})
  index = "consolidated.safetensors.index.json" if native else "model.safetensors.index.json"
  with open(os.path.join(directory, index), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  if native:
    name, config = "params.json", config_formats.to_params(cfg)
  else:  # config.json alone implies transformers' folded scale (no matter to the timing)
    name = "config.json"
    config = config_formats.to_hf(cfg.replace(softmax_scale_mode="hf_mscale_fold"))
  with open(os.path.join(directory, name), "w") as f:
    json.dump(config, f)
  return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child_convert(src: str, dst: str, queue) -> None:
  import orbax.checkpoint.experimental.v1  # noqa: F401,PLC0415  (count imports in the baseline)

  from smallfour.checkpoint import convert as convert_lib  # noqa: PLC0415 (child-only import)
  os.sync()
  baseline = _rss_bytes()
  start = time.perf_counter()
  stats = convert_lib.convert(src, dst, progress=False)
  os.sync()
  stats["synced_seconds"] = time.perf_counter() - start
  stats["baseline_rss"] = baseline
  stats["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  queue.put(stats)


def _layer_bytes(cfg: TextConfig) -> int:
  """Bytes of one converted (bfloat16) MoE decoder layer."""
  from flax import nnx  # noqa: PLC0415

  from smallfour import summary  # noqa: PLC0415
  flat = nnx.to_flat_state(summary.abstract_params(cfg))
  return sum(v.size * 2 for p, v in flat if p[:2] == ("layers", cfg.num_layers - 1))


def measure(kind: str, cfg: TextConfig, workdir: str) -> dict:
  src, dst = os.path.join(workdir, kind), os.path.join(workdir, kind + "_out")
  source_bytes = write_source(src, cfg, kind)
  copy_dir = os.path.join(workdir, kind + "_copy")
  os.makedirs(copy_dir)
  os.sync()
  start = time.perf_counter()
  for name in os.listdir(src):
    shutil.copyfile(os.path.join(src, name), os.path.join(copy_dir, name))
  copy_s = time.perf_counter() - start
  os.sync()
  copy_synced_s = time.perf_counter() - start
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_child_convert, args=(src, dst, queue))
  proc.start()
  stats = queue.get()
  proc.join()
  layer = _layer_bytes(cfg)
  for d in (src, dst, copy_dir):
    shutil.rmtree(d)
  return {
      "source_bytes": source_bytes,
      "written_bytes": stats["written_bytes"],
      "layer_bytes": layer,
      "convert_s": stats["seconds"],
      "convert_gb_s": source_bytes / stats["seconds"] / 1e9,
      "copy_gb_s": source_bytes / copy_s / 1e9,
      "throughput_vs_copy": copy_s / stats["seconds"],
      "convert_synced_gb_s": source_bytes / stats["synced_seconds"] / 1e9,
      "copy_synced_gb_s": source_bytes / copy_synced_s / 1e9,
      "synced_throughput_vs_copy": copy_synced_s / stats["synced_seconds"],
      "peak_rss_bytes": stats["peak_rss"],
      "baseline_rss_bytes": stats["baseline_rss"],
      "peak_over_baseline_vs_layer": (stats["peak_rss"] - stats["baseline_rss"]) / layer,
  }


def main(argv):
  del argv
  cfg = bench_config()
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="smallfour_bench_convert_")
  results = {kind: measure(kind, cfg, workdir) for kind in _SOURCES.value}
  mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
  print(f"config: {cfg.num_layers} layers, {cfg.num_experts} experts x {cfg.moe_intermediate_size}"
        f" wide, hidden {cfg.hidden_size}; one converted layer = {mb(_layer_bytes(cfg))}"
        " (default 8 layers, up from 4, so start-up weighs about as on the 36-layer model)")
  print("throughput = source bytes / time; 'synced' includes os.sync() (data on disk); the "
        "converter fsyncs its output itself, so compare it with copy+sync")
  print(f"{'source':<12}{'src bytes':>10}{'convert':>10}{'copy':>10}{'ratio':>7}"
        f"{'conv+sync':>11}{'copy+sync':>11}{'ratio':>7}"
        f"{'peak RSS':>10}{'above base':>12}{'x layer':>9}")
  gbs = lambda x: f"{x:.2f}GB/s"  # noqa: E731
  for kind, r in results.items():
    print(f"{kind:<12}{mb(r['source_bytes']):>10}{gbs(r['convert_gb_s']):>10}"
          f"{gbs(r['copy_gb_s']):>10}{r['throughput_vs_copy']:>7.0%}"
          f"{gbs(r['convert_synced_gb_s']):>11}{gbs(r['copy_synced_gb_s']):>11}"
          f"{r['synced_throughput_vs_copy']:>7.0%}{mb(r['peak_rss_bytes']):>10}"
          f"{mb(r['peak_rss_bytes'] - r['baseline_rss_bytes']):>12}"
          f"{r['peak_over_baseline_vs_layer']:>9.2f}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)
  if not _WORKDIR.value:
    shutil.rmtree(workdir)


if __name__ == "__main__":
  app.run(main)
