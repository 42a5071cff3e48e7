"""The router trace: what it records is the routing the model computes, and only on request."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smallfour import configs
from smallfour.nn import router_trace
from smallfour.nn.decoder import Transformer
from smallfour.nn.moe import MoE


def _top_k_within_groups(scores: np.ndarray, k: int, n_group: int, topk_group: int):
  """scores [N, E] -> expert ids [N, K]: the spec's group-limited top-k, in numpy."""
  n, e = scores.shape
  grouped = scores.reshape(n, n_group, e // n_group)
  group_scores = np.sort(grouped, -1)[..., -2:].sum(-1)  # [N, G]: each group's best two
  kept = np.argsort(-group_scores, -1)[:, :topk_group]
  masked = np.zeros_like(grouped)
  np.put_along_axis(masked, kept[:, :, None], np.take_along_axis(grouped, kept[:, :, None], 1),
                    1)
  return np.argsort(-masked.reshape(n, e), -1)[:, :k]


@pytest.mark.parametrize("groups", [(2, 1), (1, 1)])
def test_traced_choices_are_the_routers_top_k(groups):
  cfg = configs.resolve("tiny").replace(n_group=groups[0], topk_group=groups[1])
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 12)), jnp.int32)
  routing = router_trace.trace(model, tokens)
  moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
  assert sorted(routing.choices) == sorted(routing.scores) == moe_layers
  for i in moe_layers:
    scores, choices = np.asarray(routing.scores[i]), np.asarray(routing.choices[i])
    weights = np.asarray(routing.weights[i])
    assert scores.shape == (2, 12, cfg.num_experts)
    assert choices.shape == weights.shape == (2, 12, cfg.num_experts_per_tok)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-5)
    want = _top_k_within_groups(scores.reshape(-1, cfg.num_experts), cfg.num_experts_per_tok,
                                cfg.n_group, cfg.topk_group)
    np.testing.assert_array_equal(np.sort(choices.reshape(want.shape), -1), np.sort(want, -1))
    chosen = np.take_along_axis(scores, choices, -1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  # The trace is of the model's own forward pass.
  np.testing.assert_allclose(routing.logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_recording_is_off_outside_a_trace():
  model = Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 4), jnp.int32)
  router_trace.trace(model, tokens)
  model(tokens)
  routers = [layer.ffn.router for layer in model.layers if isinstance(layer.ffn, MoE)]
  assert routers and not any(r.record for r in routers)
  assert not nnx.state(model, nnx.Intermediate)  # nothing sown into the model
