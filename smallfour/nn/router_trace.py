"""Where the router sends tokens: every MoE layer's scores and chosen experts, on request.

    routing = router_trace.trace(model, tokens)   # tokens [B, S]
    routing.choices[3]                            # layer 3's experts per token [B, S, K]

Routers record nothing by default (`Router.record`), so inference and training pay
nothing; `trace` sets it for one forward pass (jitted) and collects what each router sows
with `nnx.capture`. The forward pass is the model's own `__call__`, so the trace is the
routing of exactly the computation that produces the logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from smallfour.nn.decoder import Transformer
from smallfour.nn.moe import MoE


@dataclasses.dataclass(frozen=True)
class RouterTrace:
  """Per MoE layer (keyed by layer index) of a [B, S] batch."""

  scores: dict[int, jax.Array]  # [B, S, E] float32: the router softmax over all experts
  choices: dict[int, jax.Array]  # [B, S, K] int32: the experts chosen (the router's top-k)
  weights: dict[int, jax.Array]  # [B, S, K] float32: their weights, as the MoE applies them
  logits: jax.Array  # [B, S, V]: the model's output on the same pass


def _call(model: Transformer, tokens: jax.Array, kwargs: dict[str, Any]) -> jax.Array:
  return model(tokens, **kwargs)


@nnx.jit
def _captured(model: Transformer, tokens: jax.Array,
              kwargs: dict[str, Any]) -> tuple[jax.Array, nnx.State]:
  return nnx.capture(_call, nnx.Intermediate)(model, tokens, kwargs)


def trace(model: Transformer, tokens: jax.Array, **kwargs: Any) -> RouterTrace:
  """Runs `model(tokens, **kwargs)` (tokens [B, S]; positions, valid, images as the model
  takes them) and returns every router's scores, choices and weights."""
  routers = {i: layer.ffn.router for i, layer in enumerate(model.layers)
             if isinstance(layer.ffn, MoE)}
  for router in routers.values():
    router.record = True
  try:
    logits, sown = _captured(model, tokens, kwargs)
  finally:
    for router in routers.values():
      router.record = False
  b, s = tokens.shape
  # Each router ran once on the flattened [B·S, D] tokens: one sown value per name.
  per_layer = {name: {i: sown["layers"][i]["ffn"]["router"][name].get_value()[0].reshape(
      b, s, -1) for i in routers} for name in ("scores", "choices", "weights")}
  return RouterTrace(**per_layer, logits=logits)
