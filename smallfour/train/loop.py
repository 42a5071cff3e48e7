"""A fine-tuning run: data, model, trainer, checkpoints, metrics, export (`launch/train.py`).

`<out>` holds the run: `run.json` (what must not change between a run and its
resumption), `checkpoints/` (orbax), and, after the last step, the merged model as a
regular checkpoint (`export.py`): `launch/generate.py --ckpt=<out>` chats with it.
Running the same command again with a larger `steps` resumes from the latest
checkpoint; the result equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from smallfour import sharding
from smallfour.chat import ChatTokenizer
from smallfour.config import TextConfig
from smallfour.nn.decoder import Transformer
from smallfour.train import data as data_lib
from smallfour.train import export as export_lib
from smallfour.train import lora as lora_lib
from smallfour.train import trainable as trainable_lib
from smallfour.train.checkpointing import Checkpoints
from smallfour.train.optimizer import OptimizerConfig
from smallfour.train.step import StepConfig, Trainer

RUN_FILE = "run.json"


class RunError(ValueError):
  """A run that cannot start or resume; the message says why."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  data: str  # JSONL of chat requests
  out: str
  steps: int  # train until this many updates have been applied
  batch_size: int = 8
  max_seq_len: int = 1024
  seed: int = 0  # data order and adapter initialisation
  optimizer: OptimizerConfig = OptimizerConfig()
  step: StepConfig = StepConfig()
  lora: lora_lib.LoraConfig | None = None
  trainable: str | None = None  # `train.trainable` spec; default "lora" or "all"
  on_bad_line: str = "refuse"
  checkpoint_every: int = 100
  metrics: str | None = None  # JSONL, one line per step
  export: bool = True
  progress: bool = True

  @property
  def trainable_spec(self) -> str:
    return self.trainable or ("lora" if self.lora else "all")

  def fixed(self) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoints."""
    out = dataclasses.asdict(self)
    for key in ("out", "steps", "checkpoint_every", "metrics", "export", "progress",
                "on_bad_line", "trainable"):
      out.pop(key)
    out["trainable"] = self.trainable_spec
    return out


def train(make_model: Callable[[], Transformer], model_config: TextConfig,
          tokenizer: ChatTokenizer, config: RunConfig, mesh: jax.sharding.Mesh | None = None,
          base: dict[str, Any] | None = None,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Fine-tunes the model `make_model` builds (placed on `mesh`, if any; called once the
  data has been read, so bad data fails before any weights load) and returns this run's
  step metrics.

  base: what the model is built from (recorded and checked on resume, and recorded in
  the exported checkpoint), e.g. {"ckpt": path} or {"config": "tiny", "seed": 0}.
  """
  if config.steps < 1 or config.batch_size < 1 or config.max_seq_len < 2:
    raise RunError("steps and batch_size must be >= 1 and max_seq_len >= 2")
  seq_len, chunk = data_lib.sequence_layout(config.max_seq_len, config.step.chunk)
  dataset = data_lib.read_jsonl(config.data, tokenizer, config.max_seq_len,
                                model_config.vocab_size, config.on_bad_line)
  log(f"{config.data}: {len(dataset.examples)} examples ({dataset.skipped} lines skipped, "
      f"{dataset.truncated} truncated to {config.max_seq_len + 1} tokens)")
  os.makedirs(config.out, exist_ok=True)
  _check_run_file(config, base, dataset)

  model = make_model()
  if config.lora is not None:
    try:
      lora_lib.apply_lora(model, config.lora, nnx.Rngs(config.seed))
    except ValueError as e:
      raise RunError(str(e)) from None
    if mesh is not None:
      sharding.place(model, mesh)
  try:
    select = trainable_lib.parse(config.trainable_spec)
    trainer = Trainer(model, select, config.optimizer,
                      dataclasses.replace(config.step, chunk=chunk), mesh)
  except ValueError as e:
    raise RunError(f"--trainable={config.trainable_spec}: {e}") from None
  log(f"training {trainer.num_trainable:,} parameters ({config.trainable_spec}); "
      f"batches of {config.batch_size} x {seq_len} positions")

  checkpoints = Checkpoints(config.out, config.checkpoint_every)
  start = checkpoints.latest_step() or 0
  if start:
    state, position = checkpoints.restore(start, trainer.abstract_state())
    if position != _position(config, start):
      raise RunError(f"{config.out}: checkpoint {start} is at data position {position}; "
                     f"expected {_position(config, start)}")
    log(f"resuming from step {start} in {config.out}")
  else:
    state = trainer.init()
  batches = data_lib.Batches(dataset, config.batch_size, seq_len, config.seed)
  metrics_file = _open_metrics(config.metrics, start)
  history = []
  bar = tqdm(total=config.steps, initial=min(start, config.steps), unit="step",
             disable=not config.progress, dynamic_ncols=True)
  try:
    for i in range(start, config.steps):
      batch = batches.batch(i)
      tick = time.perf_counter()
      state, metrics = trainer.step(state, trainer.put_batch(batch))
      row = _row(i + 1, jax.device_get(metrics), batch, time.perf_counter() - tick)
      history.append(row)
      if metrics_file:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
      bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}")
      bar.update()
      checkpoints.save(i + 1, state, _position(config, i + 1),
                       force=i + 1 == config.steps)
  finally:
    bar.close()
    checkpoints.close()
    if metrics_file:
      metrics_file.close()
  if start >= config.steps:
    log(f"{config.out} is at step {start} already (--steps={config.steps})")
  if config.export:
    export_lib.export(trainer.model(state), config.out, str(tokenizer.path),
                      {"kind": "finetuned", "base": base, "steps": max(start, config.steps)})
    log(f"wrote the merged model to {config.out} (launch/generate.py --ckpt={config.out})")
  return history


def _position(config: RunConfig, step: int) -> dict[str, int]:
  return {"examples_seen": step * config.batch_size, "data_seed": config.seed}


def _row(step: int, metrics: dict[str, Any], batch: dict[str, np.ndarray],
         seconds: float) -> dict[str, Any]:
  real = int(batch["valid"].sum())
  return {"step": step, "loss": float(metrics["loss"]),
          "aux_loss": float(metrics["aux_loss"]), "grad_norm": float(metrics["grad_norm"]),
          "learning_rate": float(metrics["learning_rate"]),
          "tokens": int(metrics["tokens"]), "tokens_per_s": real / seconds,
          "seconds": seconds, "padding": 1.0 - real / batch["valid"].size,
          "expert_fractions": np.round(metrics["expert_fractions"], 6).tolist()}


def _open_metrics(path: str | None, start: int):
  """The metrics file, keeping the lines of steps up to `start` when resuming (an
  interrupted run may have logged steps past its last checkpoint)."""
  if path is None:
    return None
  kept = []
  if start and os.path.exists(path):
    with open(path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
  f = open(path, "w")  # noqa: SIM115 (closed by train)
  f.writelines(kept)
  return f


def _check_run_file(config: RunConfig, base: dict[str, Any] | None,
                    dataset: data_lib.Dataset) -> None:
  """Writes `<out>/run.json`, or checks that this run is the one recorded there."""
  record = {"config": json.loads(json.dumps(config.fixed())), "base": base,
            "data_sha256": _sha256(config.data), "examples": len(dataset.examples)}
  path = os.path.join(config.out, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    diff = _differences(previous, record)
    if diff:
      raise RunError(f"{config.out} holds a different run ({'; '.join(diff[:3])}); resume "
                     "it with the same settings (only --steps may grow) or choose another --out")
    return
  with open(path + ".partial", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".partial", path)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new))
            for d in _differences(old.get(k), new.get(k), f"{where}.{k}" if where else k)]
  return [] if old == new else [f"{where}: {old!r} then, {new!r} now"]


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
