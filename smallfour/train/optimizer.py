"""AdamW with global-norm clipping and a warmup + cosine learning-rate schedule (optax).

The schedule depends on its own horizon (`warmup_steps`, `decay_steps`), never on how
many steps a run is asked for: a run stopped at step 100 and resumed with `--steps=200`
follows exactly the curve an uninterrupted 200-step run does.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-4  # the peak, reached after warmup
  warmup_steps: int = 10  # linear from learning_rate / warmup_steps (step 0 trains too)
  decay_steps: int = 1000  # cosine from the peak to final_fraction of it, constant after
  final_fraction: float = 0.1
  weight_decay: float = 0.0  # decoupled (AdamW), on matrices only, never on norm scales
  clip_norm: float = 1.0  # of the global gradient norm
  b1: float = 0.9
  b2: float = 0.95

  def schedule(self) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        self.learning_rate / max(self.warmup_steps, 1), self.learning_rate, self.warmup_steps,
        self.warmup_steps + self.decay_steps, end_value=self.learning_rate * self.final_fraction)

  def make(self) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(self.clip_norm),
        optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
