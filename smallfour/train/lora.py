"""Low-rank adapters on the model's weights, and merging them back in.

`W + (α/r)·A·B` stands in for a weight `W`: a `LoraWeight` holds the frozen `base`
and the adapter pair, and reads like the `nnx.Param` it replaces (`w[...]`), so every
use of the weight sees the adapted value: the chunked teacher-forced attention, the
absorbed decode (which contracts `k_up` over another axis than prefill), and the routed
experts under `shard_map`. The adapted weight is formed where it is read (one layer at a
time under the train step's remat), a weight-sized temporary.

Why not qwix's LoRA: it adds adapters by intercepting the `einsum`/`dot_general` calls
that consume a parameter, with shapes taken from that call's equation. Here one weight
is consumed by several equations (`k_up` and `o_proj` head-major in prefill, `k_up`
contracted over its nope axis in decode) and the experts are sliced per block inside
the MoE kernels, so the adapter would be bound to one call site, not to the weight.
An adapter on the weight itself is exact for all of them and merges trivially.

Each target names its weight's axes (einsum letters), the ones the adapter reads
(`fan_in`) and those it keeps separate (`batch`: one adapter per expert).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour.nn.decoder import Transformer
from smallfour.nn.mla import MLA
from smallfour.nn.moe import RoutedExperts

_RANK = "z"  # the rank's letter in the equations below (no weight uses it)


@dataclasses.dataclass(frozen=True)
class Target:
  axes: str  # the weight's axes, one letter each
  fan_in: str  # the axes the adapter's A contracts with the input
  batch: str = ""  # axes with one adapter each (experts)


# What `--lora_targets` names: `attn` (MLA's projections) and `experts` (routed experts).
TARGETS: dict[str, tuple[type[nnx.Module], dict[str, Target]]] = {
    "attn": (MLA, {
        "q_a_proj": Target("dq", "d"),  # [D, Q]
        "q_b_proj": Target("qhk", "q"),  # [Q, H, Dn + Dr]
        "kv_a_proj": Target("dk", "d"),  # [D, R + Dr]
        "k_up": Target("hrn", "r"),  # [H, R, Dn]
        "v_up": Target("hvr", "r"),  # [H, Dv, R]
        "o_proj": Target("hvd", "hv"),  # [H, Dv, D]
    }),
    "experts": (RoutedExperts, {
        "gate_proj": Target("edf", "d", batch="e"),  # [E, D, F]
        "up_proj": Target("edf", "d", batch="e"),
        "down_proj": Target("efd", "f", batch="e"),  # [E, F, D]
    }),
}


class LoraParam(nnx.Param):
  """An adapter weight: what `--trainable=lora` selects."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int
  targets: tuple[str, ...] = ("attn",)
  alpha: float | None = None  # default: the rank (the adapter's scale α/r is 1)

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank


class LoraWeight(nnx.Module):
  """`base + scale · A·B`, read with `w[...]` like the `nnx.Param` it stands in for.

  A: [*batch, *fan_in, r] drawn from N(0, 1/fan_in); B: [*batch, r, *rest] zeros, so a
  fresh adapter leaves the model unchanged. Adapters are float32 whatever the base's
  dtype; their product is cast to it. Each carries the logical axes of the base's
  matching axes plus `lora_rank`, so the rule table places it like its weight.
  """

  def __init__(self, base: nnx.Param, target: Target, rank: int, scale: float,
               rngs: nnx.Rngs):
    value = base.get_value()
    names = dict(zip(target.axes, base.get_metadata()["out_sharding"]))
    sizes = dict(zip(target.axes, value.shape))
    rest = "".join(c for c in target.axes if c not in target.fan_in + target.batch)
    self.a_axes = target.batch + target.fan_in + _RANK
    self.b_axes = target.batch + _RANK + rest
    self.out_axes = target.axes
    self.scale = scale
    names[_RANK], sizes[_RANK] = "lora_rank", rank
    fan_in = 1
    for c in target.fan_in:
      fan_in *= sizes[c]
    shape = lambda axes: tuple(sizes[c] for c in axes)  # noqa: E731
    logical = lambda axes: tuple(names[c] for c in axes)  # noqa: E731
    self.base = base
    self.a = LoraParam(jax.random.normal(rngs.params(), shape(self.a_axes), jnp.float32)
                       * fan_in**-0.5, out_sharding=logical(self.a_axes),
                       eager_sharding=False)
    self.b = LoraParam(jnp.zeros(shape(self.b_axes), jnp.float32),
                       out_sharding=logical(self.b_axes), eager_sharding=False)

  def value(self) -> jax.Array:
    """The adapted weight, in the base's dtype and layout."""
    base = self.base[...]
    delta = jnp.einsum(f"{self.a_axes},{self.b_axes}->{self.out_axes}", self.a[...],
                       self.b[...])
    return (base.astype(jnp.float32) + self.scale * delta).astype(base.dtype)

  def __getitem__(self, index) -> jax.Array:
    return self.value()[index]


def apply_lora(model: Transformer, config: LoraConfig, rngs: nnx.Rngs) -> Transformer:
  """Replaces every targeted weight of `model` with a `LoraWeight` (in place)."""
  if config.rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {config.rank}")
  if unknown := sorted(set(config.targets) - set(TARGETS)):
    raise ValueError(f"unknown LoRA targets {unknown}; known: {sorted(TARGETS)}")
  for _, module in _modules(model):
    for name in config.targets:
      kind, weights = TARGETS[name]
      if isinstance(module, kind):
        for attr, target in weights.items():
          base = getattr(module, attr)
          if not isinstance(base, nnx.Param):
            raise ValueError(f"LoRA needs plain weights; {kind.__name__}.{attr} is a "
                             f"{type(base).__name__} (FP8-resident weights cannot be adapted)")
          setattr(module, attr, LoraWeight(base, target, config.rank, config.scale, rngs))
  return model


def merge_lora(model: Transformer) -> Transformer:
  """Folds every adapter into its weight (in place): a plain model, as converted ones are."""
  for _, module in _modules(model):
    for attr, value in list(vars(module).items()):
      if isinstance(value, LoraWeight):
        meta = value.base.get_metadata()
        setattr(module, attr, nnx.Param(value.value(), **_param_metadata(meta)))
  return model


def _param_metadata(meta: dict[str, Any]) -> dict[str, Any]:
  return {k: meta[k] for k in ("out_sharding", "eager_sharding") if k in meta}


def _modules(model: nnx.Module) -> list[tuple[Any, nnx.Module]]:
  # A list first: the loops above replace attributes of the graph they walk.
  return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
