"""Parameter counts of a config, computed abstractly (nothing is allocated)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from smallfour.config import TextConfig
from smallfour.nn.decoder import Transformer


def abstract_params(cfg: TextConfig, param_dtype: jnp.dtype = jnp.bfloat16) -> nnx.State:
  """The parameter state of `cfg` as ShapeDtypeStructs, via `nnx.eval_shape`."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  return nnx.state(model, nnx.Param)


def param_counts(cfg: TextConfig) -> dict[str, Any]:
  """Total parameters and parameters active per token (spec §1.4).

  A token runs every non-expert weight, its `num_experts_per_tok` routed experts and
  the shared experts. "without embeddings" excludes the embedding table and the LM head.
  """
  groups = {"embedding": 0, "lm_head": 0, "routed_experts": 0, "other": 0}
  for path, var in nnx.to_flat_state(abstract_params(cfg)):
    if path[0] == "embedder":
      key = "embedding"
    elif path[0] == "lm_head":
      key = "lm_head"
    elif "experts" in path:
      key = "routed_experts"
    else:
      key = "other"
    groups[key] += var.size
  active_routed = groups["routed_experts"] * cfg.num_experts_per_tok // cfg.num_experts
  active = groups["other"] + active_routed
  return {
      "total_params": sum(groups.values()),
      "embedding_params": groups["embedding"],
      "lm_head_params": groups["lm_head"],
      "routed_expert_params": groups["routed_experts"],
      "active_params_per_token": {
          "without_embeddings": active,
          "with_lm_head": active + groups["lm_head"],
          "with_embeddings": active + groups["lm_head"] + groups["embedding"],
      },
  }
