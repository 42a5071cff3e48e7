"""The jitted train step: loss, gradient, AdamW update, over a sharded model.

The model is split once into (graphdef, trainable params, frozen rest); the step is a
pure function of the `TrainState` (step, trainable params, optimizer state), the
frozen parameters and a batch, merged inside. On a mesh every input and output has an
explicit sharding from the rule table: routed experts over `expert`, the batch over
(`data`, `expert`) as far as it divides, the optimizer's moments like their
parameters; the state is donated, so parameters and moments are updated in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from smallfour import sharding
from smallfour.nn.decoder import Transformer
from smallfour.train import forward, loss, trainable
from smallfour.train.optimizer import OptimizerConfig

BATCH_AXES = ("batch", "length")
BATCH_KEYS = ("tokens", "targets", "loss_mask", "valid")  # each [B, S]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  chunk: int = 512  # positions per attention / loss chunk
  aux_loss_coef: float = 0.0  # load-balancing loss weight (0: logged, not trained)
  remat: bool = True  # recompute each decoder block in the backward


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # [] int32: updates applied so far
  params: nnx.State  # the trainable parameters
  opt_state: Any


class Trainer:
  """A model split for training, and its compiled step.

  `trainable`: an nnx filter (`train.trainable.parse`); the other parameters are frozen
  (held here, passed to the step, never updated). `mesh`: where the model's parameters
  live (`sharding.place` / `init_sharded` / `restore_model(mesh=...)`), None for one
  device.
  """

  def __init__(self, model: Transformer, trainable_filter: trainable.Filter,
               optimizer: OptimizerConfig, config: StepConfig,
               mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.mesh = None if mesh is None or mesh.size == 1 else mesh
    self.schedule = optimizer.schedule()
    self.tx = optimizer.make()
    self.graphdef, params, self.frozen = nnx.split(model, trainable_filter, ...)
    if not jax.tree.leaves(params):
      raise ValueError("the trainable filter selects no parameter")
    self.param_shardings = self._shardings(params)
    self.frozen_shardings = self._shardings(self.frozen)
    self._params = params  # until `init` takes them
    self._abstract_params = self._abstract(params, self.param_shardings)
    whole = self._replicated()
    self.opt_shardings = None if self.mesh is None else optax.tree_map_params(
        self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, params), self.param_shardings,
        transform_non_params=lambda _: whole)
    self.state_shardings = None if self.mesh is None else TrainState(
        whole, self.param_shardings, self.opt_shardings)
    self._init = sharding.under_mesh(self.mesh, jax.jit(
        self._init_impl, donate_argnums=(0,), out_shardings=self.state_shardings))
    self._step_jit = jax.jit(self._step_impl, donate_argnums=(0,),
                             out_shardings=(self.state_shardings, whole))
    self._step = sharding.under_mesh(self.mesh, self._step_jit)

  # ------------------------------------------------------------------ public API

  @property
  def num_trainable(self) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._abstract_params))

  def init(self) -> TrainState:
    """Step 0: the model's trainable parameters and fresh optimizer moments.

    Once only: the parameters are donated to the state (the model passed in no longer
    holds them). A resumed run restores a state instead (`abstract_state`)."""
    if self._params is None:
      raise RuntimeError("Trainer.init was called already")
    params, self._params = self._params, None
    return self._init(params)

  def abstract_state(self) -> TrainState:
    """The state as ShapeDtypeStructs with their shardings (restore targets)."""
    shapes = jax.eval_shape(self._init_impl, self._abstract_params)
    return self._abstract(shapes, self.state_shardings)

  def step(self, state: TrainState, batch: dict[str, jax.Array]
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. batch: BATCH_KEYS -> [B, S] arrays (`put_batch`). The state is donated.

    Metrics: loss (cross-entropy over the marked tokens), aux_loss (mean over MoE layers
    of the balance loss, 1 when balanced), grad_norm (before clipping), learning_rate
    (this step's), tokens (marked tokens), expert_fractions [MoE layers, E].
    """
    return self._step(state, self.frozen, batch)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays (the same on every process) -> device arrays, split by the rule table."""
    if self.mesh is None:
      return {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    out = {}
    for k in BATCH_KEYS:
      value = np.asarray(batch[k])
      placement = sharding.logical_sharding(BATCH_AXES, value.shape, self.mesh)
      out[k] = jax.make_array_from_callback(value.shape, placement, lambda i, v=value: v[i])
    return out

  def lower(self, batch_size: int, seq_len: int) -> jax.stages.Lowered:
    """The step lowered from abstract inputs (nothing allocated; the model may be
    abstract, e.g. the 119B release on a simulated mesh)."""
    state = self.abstract_state()
    frozen = self._abstract(self.frozen, self.frozen_shardings)
    shape = (batch_size, seq_len)
    placement = (None if self.mesh is None
                 else sharding.logical_sharding(BATCH_AXES, shape, self.mesh))
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.bool_ if k in ("loss_mask", "valid")
                                     else jnp.int32, sharding=placement) for k in BATCH_KEYS}
    return sharding.under_mesh(self.mesh, self._step_jit.lower)(state, frozen, batch)

  def model(self, state: TrainState) -> Transformer:
    """The model with this state's trainable parameters (shares arrays with the state)."""
    return nnx.merge(self.graphdef, state.params, self.frozen)

  # ------------------------------------------------------------- compiled parts

  def _init_impl(self, params):
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

  def _step_impl(self, state: TrainState, frozen, batch):
    cfg = self.config

    def objective(params):
      model = nnx.merge(self.graphdef, params, frozen)
      h, routing = forward.hidden_states(model, batch["tokens"], batch["valid"], cfg.chunk,
                                         cfg.remat)
      ce = loss.masked_mean(loss.token_losses(model, h, batch["targets"], cfg.chunk),
                            batch["loss_mask"])
      aux = (jnp.mean(jnp.stack([r.aux for r in routing])) if routing
             else jnp.zeros((), jnp.float32))
      fractions = (jnp.stack([r.fractions for r in routing]) if routing
                   else jnp.zeros((0, 0), jnp.float32))
      return ce + cfg.aux_loss_coef * aux, (ce, aux, fractions)

    (_, (ce, aux, fractions)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": ce, "aux_loss": aux, "grad_norm": optax.tree.norm(grads),
               "learning_rate": self.schedule(state.step),
               "tokens": batch["loss_mask"].sum(), "expert_fractions": fractions}
    return TrainState(state.step + 1, params, opt_state), metrics

  # ------------------------------------------------------------ mesh plumbing

  def _shardings(self, state: nnx.State):
    return None if self.mesh is None else sharding.named_shardings(state, self.mesh)

  def _replicated(self):
    return None if self.mesh is None else sharding.replicated(self.mesh)

  @staticmethod
  def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s arrays (or of its ShapeDtypeStructs), placed."""
    if shardings is None:
      return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)
