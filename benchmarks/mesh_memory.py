"""Per-device memory of the 119B release on the meshes the README recommends, on paper.

  python benchmarks/mesh_memory.py                 # table for every preset mesh
  python benchmarks/mesh_memory.py --check_compile # also compile the 8-device decode step

Parameter bytes per device come from the rule table's shardings of the abstract model
(`shard_shape` of every parameter: nothing is allocated); the cache is the serving engine's
page pool, L·(B·T + page)·(R+Dr)·itemsize (B·T tokens in pages of 16, + the sink page),
whole on every device. `--check_compile` lowers and compiles the real paged decode step
(`PagedModel.lower_decode`) for (data 1, expert 8) on simulated CPU devices and prints XLA's
memory analysis: its argument bytes must equal the table's weights + pool. (XLA:CPU's temp
figure is not a GPU's: it widens bf16 operands to float32 in buffers of its own.)
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=64").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from smallfour import configs  # noqa: E402
from smallfour import sharding, summary  # noqa: E402
from smallfour.plan import counts  # noqa: E402
from smallfour.inference.paged import PagedModel  # noqa: E402
from smallfour.nn.decoder import Transformer  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 8, "Sequences decoded together.")
_CONTEXT = flags.DEFINE_integer("context", 32768, "Tokens per sequence (the pool holds "
                                "batch × context).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page of the pool.")
_CHECK = flags.DEFINE_bool("check_compile", False, "Compile the 8-device step, compare.")
_JSON = flags.DEFINE_string("json", None, "Also write the table here.")

# name, mesh, memory per device (GB), how it is laid out
MESHES = [
    ("4x H100 80GB", "data:1,expert:4,tensor:1", 80),
    ("8x H100 80GB", "data:1,expert:8,tensor:1", 80),
    ("2 hosts x 8x H100", "data:2,expert:8,tensor:1", 80),
    ("TPU v5p-16 (8 chips)", "data:1,expert:8,tensor:1", 95),
    ("TPU v5p-32 (16 chips)", "data:1,expert:16,tensor:1", 95),
]


def weight_bytes_per_device(cfg, sizes: dict[str, int]) -> counts.WeightBytes:
  """Parameter bytes one device holds by role (bf16), from the rule table's shard shapes."""
  return counts.weight_bytes(summary.abstract_params(cfg, jnp.bfloat16), sizes)


def cache_bytes_per_device(cfg, sizes: dict[str, int], batch: int, context: int,
                           page_size: int = 16) -> int:
  """The page pool of batch × context tokens (with its sink page) one device holds, bf16."""
  return counts.pool_bytes(cfg, sizes, batch * context // page_size, page_size,
                           jnp.dtype(jnp.bfloat16).itemsize)


def main(argv):
  del argv
  cfg = configs.resolve("small4_119b")
  rows = []
  print(f"small4_119b, bf16 weights and cache, batch {_BATCH.value}, context {_CONTEXT.value} "
        f"(a page pool of {_BATCH.value * _CONTEXT.value} tokens on every device)")
  print(f"{'hardware':24} {'mesh':28} {'weights GB':>10} {'vision GB':>9} {'cache GB':>9} "
        f"{'left GB':>8}")
  for name, spec, hbm in MESHES:
    sizes = sharding.parse_mesh(spec)
    weights = weight_bytes_per_device(cfg, sizes)
    text = weights.total - weights.vision
    cache = cache_bytes_per_device(cfg, sizes, _BATCH.value, _CONTEXT.value, _PAGE_SIZE.value)
    left = hbm * 1e9 - weights.total - cache
    rows.append(dict(hardware=name, mesh=spec, weights_gb=text / 1e9,
                     vision_gb=weights.vision / 1e9, cache_gb=cache / 1e9, left_gb=left / 1e9))
    print(f"{name:24} {spec:28} {text / 1e9:10.1f} {weights.vision / 1e9:9.2f} "
          f"{cache / 1e9:9.2f} {left / 1e9:8.1f}")
  if _CHECK.value:
    sizes = sharding.parse_mesh("data:1,expert:8,tensor:1")
    mesh = sharding.make_mesh(sizes, cfg)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0),
                                               param_dtype=jnp.bfloat16))
    paged = PagedModel(model, num_pages=_BATCH.value * _CONTEXT.value // _PAGE_SIZE.value,
                       page_size=_PAGE_SIZE.value, mesh=mesh)
    stats = paged.lower_decode(_BATCH.value, _CONTEXT.value).compile().memory_analysis()
    weights = weight_bytes_per_device(cfg, sizes)
    # The step takes the text weights; the vision encoder's are held beside it.
    want = (weights.total - weights.vision + cache_bytes_per_device(
        cfg, sizes, _BATCH.value, _CONTEXT.value, _PAGE_SIZE.value))
    print(f"compiled (1,8,1) decode step: arguments {stats.argument_size_in_bytes / 1e9:.2f} GB "
          f"(table: weights + pool {want / 1e9:.2f} GB; + tokens/page table/keys), "
          f"XLA:CPU temp {stats.temp_size_in_bytes / 1e9:.2f} GB")
    rows.append(dict(check="data:1,expert:8,tensor:1",
                     compiled_argument_gb=stats.argument_size_in_bytes / 1e9,
                     table_gb=want / 1e9))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
