"""Per-device memory of the 119B LoRA train step, compiled for hardware that need not be here.

  python benchmarks/train_memory.py --target=v5p:2x2x2 --batch_size=8 --seq_len=4096
  python benchmarks/train_memory.py --target=cpu --layers=2  # 8 simulated CPU devices

Builds the release's model abstractly (bf16, LoRA rank 16 on the attention
projections, only the adapters trainable), lowers `Trainer.step` from abstract inputs
on a (data, expert, tensor) mesh of the target's devices and compiles it: for a TPU
topology with libtpu (`jax.experimental.topologies`, no TPU needed), else for XLA:CPU.
Prints XLA's memory analysis per device as JSON. XLA:CPU widens bf16 matmuls to
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
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from smallfour import configs, sharding  # noqa: E402
from smallfour.nn.decoder import Transformer  # noqa: E402
from smallfour.train import lora, trainable  # noqa: E402
from smallfour.train.optimizer import OptimizerConfig  # noqa: E402
from smallfour.train.step import StepConfig, Trainer  # noqa: E402

_TARGET = flags.DEFINE_string("target", "v5p:2x2x2", "A TPU topology name, or cpu.")
_MESH = flags.DEFINE_string("mesh", "data:1,expert:8,tensor:1", "Mesh axis sizes.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Positions per sequence.")
_RANK = flags.DEFINE_integer("lora_rank", 16, "LoRA rank.")
_TARGETS = flags.DEFINE_list("lora_targets", ["attn"], "attn and/or experts.")
_LAYERS = flags.DEFINE_integer("layers", None, "Fewer decoder layers (a quicker compile).")


def main(argv):
  del argv
  cfg = configs.resolve("small4_119b")
  if _LAYERS.value:
    cfg = cfg.replace(num_layers=_LAYERS.value)
  devices = (jax.devices() if _TARGET.value == "cpu" else
             topologies.get_topology_desc(topology_name=_TARGET.value, platform="tpu").devices)
  mesh = sharding.make_mesh(sharding.parse_mesh(_MESH.value), cfg, devices=devices)
  model = nnx.eval_shape(lambda: lora.apply_lora(
      Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16),
      lora.LoraConfig(_RANK.value, tuple(_TARGETS.value)), nnx.Rngs(1)))
  trainer = Trainer(model, trainable.parse("lora"), OptimizerConfig(), StepConfig(), mesh)
  start = time.perf_counter()
  compiled = trainer.lower(_BATCH.value, _SEQ.value).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  gb = lambda n: round(n / 1e9, 2)  # noqa: E731
  print(json.dumps({
      "target": _TARGET.value, "mesh": _MESH.value, "layers": cfg.num_layers,
      "batch_size": _BATCH.value, "seq_len": _SEQ.value, "lora_rank": _RANK.value,
      "lora_targets": _TARGETS.value, "trainable_params": trainer.num_trainable,
      "compile_s": round(seconds, 1),
      "argument_gb": gb(memory.argument_size_in_bytes),
      "temp_gb": gb(memory.temp_size_in_bytes),
      "output_gb": gb(memory.output_size_in_bytes),
      "alias_gb": gb(memory.alias_size_in_bytes)}))


if __name__ == "__main__":
  app.run(main)
