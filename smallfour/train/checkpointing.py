"""Training checkpoints: orbax `CheckpointManager` under `<out>/checkpoints/<step>/`.

Each holds the `TrainState` (step, trainable parameters, optimizer state; every array
restored straight into its sharding) and, as JSON, the data position and the seed of
the data order. Frozen parameters are not saved: they come from the base model
(`--ckpt` or the seeded preset) the run names, which `<out>/run.json` records.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from smallfour.train.step import TrainState

CHECKPOINTS_DIR = "checkpoints"


class Checkpoints:
  """Saves every `every` steps (and when asked), keeps the latest `keep`."""

  def __init__(self, out_dir: str, every: int, keep: int = 3):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(out_dir, CHECKPOINTS_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data: dict[str, Any], force: bool = False
           ) -> None:
    """Asynchronous: training goes on while the arrays are written."""
    if force or step % self.every == 0:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=force)

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """target: `Trainer.abstract_state()` (shapes, dtypes and shardings)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
