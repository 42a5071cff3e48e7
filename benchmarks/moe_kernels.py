"""Routed-expert kernels (smallfour.nn.moe_kernels), one MoE layer, each under jit.

  python benchmarks/moe_kernels.py                       # the decode-benchmark shape
  python benchmarks/moe_kernels.py --json=moe.json --tokens=1,2,4,8

Shape of the decode benchmark config (benchmarks/decode.py): 64 experts, hidden 1024,
expert width 256, top-4, float32. Routing is the top-k of random logits (balanced in
expectation), weights random. For each token count N and kernel: one compile + warm-up
call, then the median (and min) of --repeats timed calls, each to block_until_ready, in
two passes (see time_kernels). Also printed: the kernel `select_kernel` picks for N on
this backend (*), the useful throughput 6·N·K·D·F flops / time (what a perfect grouped
matmul would do; compare ~60-100 GFLOP/s for a big float32 matmul here) and the distinct
routed experts' weight bytes / time (compare ~20 GB/s read bandwidth, DESIGN.md; repeated
calls find small N's few experts in cache, so decode figures are optimistic).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from smallfour.nn import moe_kernels

_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_TOKENS = flags.DEFINE_list("tokens", ["1", "8", "64", "1024"], "Token counts N.")
_KERNELS = flags.DEFINE_list("kernels", sorted(moe_kernels.KERNELS), "Kernels to time.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per cell (3 if a call > 1 s).")
_EXPERTS = flags.DEFINE_integer("experts", 64, "Routed experts E.")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Hidden size D.")
_WIDTH = flags.DEFINE_integer("width", 256, "Expert width F.")
_TOP_K = flags.DEFINE_integer("top_k", 4, "Experts per token K.")
_MAX_GATHER_GB = flags.DEFINE_float(
    "max_gather_gb", 2.0, "Skip `gather` where its [N, K, D, F] weight copies would exceed "
    "this (1024 tokens: 12 GB, ~7 s a call), to spare a shared machine's memory.")


def time_kernels(fns: dict, args, repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each fn, after a compile + warm-up call each.

  Consecutive calls of one kernel (as a real step would repeat it), in two passes, the
  kernels in order then reversed, so that load from other processes on a shared machine
  biases no kernel in particular. Interleaving call by call instead would let the big
  kernels evict the small ones' weights from cache. A kernel whose warm-up call took over
  a second gets 3 calls in all.
  """
  calls = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls[name] = 3 if time.perf_counter() - start > 1.0 else repeats
  times = {name: [] for name in fns}
  for first, order in ((True, list(fns)), (False, list(fns)[::-1])):
    for name in order:
      while len(times[name]) < ((calls[name] + 1) // 2 if first else calls[name]):
        start = time.perf_counter()
        jax.block_until_ready(fns[name](*args))
        times[name].append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  e, d, f, k = _EXPERTS.value, _HIDDEN.value, _WIDTH.value, _TOP_K.value
  backend = jax.default_backend()
  rng = np.random.default_rng(0)
  weights_arrays = [
      jnp.asarray(rng.standard_normal(shape) * shape[1]**-0.5, jnp.float32)
      for shape in ((e, d, f), (e, d, f), (e, f, d))]
  kernels = {name: jax.jit(moe_kernels.KERNELS[name]) for name in _KERNELS.value}
  results = []
  print(f"backend={backend} devices={len(jax.devices())} E={e} D={d} F={f} K={k} float32")
  header = (f"{'tokens':>6} {'kernel':>14} {'median ms':>10} {'min ms':>9} {'GFLOP/s':>8} "
            f"{'GB/s':>6} {'vs best':>8}  selected")
  print(header)
  for n in map(int, _TOKENS.value):
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    ids = jnp.asarray(np.argsort(-rng.standard_normal((n, e)), axis=1)[:, :k], jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    args = (*weights_arrays, x, weights, ids)
    selected = moe_kernels.select_kernel(n, backend)
    # Lower bounds' numerators: a perfect grouped matmul's flops, and the bytes of the
    # distinct experts' weights that any exact kernel must read.
    flops = 6 * n * k * d * f
    weight_bytes = len(np.unique(np.asarray(ids))) * 3 * d * f * 4
    timed = dict(kernels)
    if n * k * 3 * d * f * 4 > _MAX_GATHER_GB.value * 1e9:
      timed.pop("gather", None)
      print(f"{n:>6} {'gather':>14}  skipped: its weight copies exceed --max_gather_gb")
    rows = []
    for name, times in time_kernels(timed, args, _REPEATS.value).items():
      median = statistics.median(times)
      rows.append(dict(tokens=n, kernel=name, median_ms=median * 1e3, min_ms=min(times) * 1e3,
                       calls=len(times), useful_gflop_s=flops / median / 1e9,
                       weight_gb_s=weight_bytes / median / 1e9, selected=name == selected))
    best = min(r["median_ms"] for r in rows)
    for r in rows:
      r["vs_best"] = r["median_ms"] / best
      print(f"{n:>6} {r['kernel']:>14} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
            f"{r['useful_gflop_s']:>8.1f} {r['weight_gb_s']:>6.1f} {r['vs_best']:>7.2f}x  "
            f"{'*' if r['selected'] else ''}",
            flush=True)
    results += rows
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump(dict(backend=backend, experts=e, hidden=d, width=f, top_k=k, dtype="float32",
                     block_size={n: moe_kernels.default_block_size(int(n) * k, e)
                                 for n in _TOKENS.value},
                     results=results), fh, indent=2)


if __name__ == "__main__":
  app.run(main)
