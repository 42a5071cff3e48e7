"""Per-device memory of the 119B LoRA train step, compiled for hardware that need not be here.

  python benchmarks/train_memory.py --target=v5p:2x2x2 --batch_size=8 --seq_len=4096
  python benchmarks/train_memory.py --target=v5p:2x2x2 --layers=2  # one compile
  python benchmarks/train_memory.py --target=cpu --layers=2  # 8 simulated CPU devices

Builds the release's model abstractly (bf16, LoRA rank 16 on the attention
projections, only the adapters trainable), lowers `Trainer.step` from abstract inputs
on a (data, expert, tensor) mesh of the target's devices and compiles it: for a TPU
topology with libtpu (`jax.experimental.topologies`, no TPU needed), else for XLA:CPU.
Prints XLA's memory analysis per device as JSON.

The decoder layers are unrolled, so compile time grows with them (about 6 minutes per
layer for XLA:TPU on this 2-core VM: all 36 would take hours). Without --layers the
step is therefore compiled with 1 and 2 layers, and the 36-layer figures are
extrapolated: arguments exactly (every layer has the same shapes; the script also sums
them from the abstract model's shard shapes), temporaries linearly (under per-block
remat each further layer keeps its input activations for the backward). XLA:CPU widens bf16 matmuls to
float32 (whole f32 copies of the LM head and experts appear), so only a TPU target's
figures describe an accelerator.
"""

import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's start-up probes
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
if "--target=cpu" in os.sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from smallfour import configs, sharding  # noqa: E402
from smallfour.nn.decoder import Transformer  # noqa: E402
from smallfour.train import data, lora, trainable  # noqa: E402
from smallfour.train.optimizer import OptimizerConfig  # noqa: E402
from smallfour.train.step import StepConfig, Trainer  # noqa: E402

_TARGET = flags.DEFINE_string("target", "v5p:2x2x2", "A TPU topology name, or cpu.")
_MESH = flags.DEFINE_string("mesh", "data:1,expert:8,tensor:1", "Mesh axis sizes.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Positions per sequence.")
_RANK = flags.DEFINE_integer("lora_rank", 16, "LoRA rank.")
_TARGETS = flags.DEFINE_list("lora_targets", ["attn"], "attn and/or experts.")
_LAYERS = flags.DEFINE_integer("layers", None, "Fewer decoder layers (a quicker compile).")


def _compile(cfg, devices) -> dict:
  """Compiles the LoRA step of `cfg` on the mesh; XLA's per-device figures in bytes."""
  mesh = sharding.make_mesh(sharding.parse_mesh(_MESH.value), cfg, devices=devices)
  model = nnx.eval_shape(lambda: lora.apply_lora(
      Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16),
      lora.LoraConfig(_RANK.value, tuple(_TARGETS.value)), nnx.Rngs(1)))
  seq_len, chunk = data.sequence_layout(_SEQ.value, StepConfig().chunk)
  trainer = Trainer(model, trainable.parse("lora"), OptimizerConfig(), StepConfig(chunk=chunk),
                    mesh)
  start = time.perf_counter()
  memory = trainer.lower(_BATCH.value, seq_len).compile().memory_analysis()
  flat = zip(jax.tree_util.tree_leaves_with_path(trainer.frozen),
             jax.tree.leaves(trainer.frozen_shardings))
  weights = sum(int(np.prod(s.shard_shape(v.shape))) * v.dtype.itemsize
                for (path, v), s in flat if path[0].key != "vision")  # text-only batches
  return {"layers": cfg.num_layers, "trainable_params": trainer.num_trainable,
          "compile_s": round(time.perf_counter() - start, 1),
          "weights": weights, "argument": memory.argument_size_in_bytes,
          "temp": memory.temp_size_in_bytes, "output": memory.output_size_in_bytes,
          "alias": memory.alias_size_in_bytes}


def main(argv):
  del argv
  full = configs.resolve("small4_119b")
  devices = (jax.devices() if _TARGET.value == "cpu" else
             topologies.get_topology_desc(topology_name=_TARGET.value, platform="tpu").devices)
  layers = [_LAYERS.value] if _LAYERS.value else [1, 2]
  runs = [_compile(full.replace(num_layers=n), devices) for n in layers]
  gb = lambda n: round(n / 1e9, 2)  # noqa: E731
  out = {"target": _TARGET.value, "mesh": _MESH.value, "batch_size": _BATCH.value,
         "seq_len": _SEQ.value, "lora_rank": _RANK.value, "lora_targets": _TARGETS.value,
         "compiled": [{k: gb(v) if k in ("weights", "argument", "temp", "output", "alias")
                       else v for k, v in r.items()} for r in runs]}
  if len(runs) == 2:
    one, two = runs
    n = full.num_layers - 1
    per_layer = {k: two[k] - one[k] for k in ("argument", "temp", "weights")}
    out["extrapolated_to_layers"] = full.num_layers
    out["trainable_params"] = one["trainable_params"] * full.num_layers
    for k in ("argument", "temp", "weights"):
      out[f"{k}_gb"] = gb(one[k] + n * per_layer[k])
    out["per_device_gb"] = gb(one["argument"] + one["temp"]
                              + n * (per_layer["argument"] + per_layer["temp"]))
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
