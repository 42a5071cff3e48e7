"""What a config costs, computed abstractly (nothing is allocated): parameter counts,
the weight bytes a decode step must read and the matmul FLOPs of a prefill.

The last two are the denominators of the roofline figures in benchmarks/decode.py.
"""

from __future__ import annotations

import copy
from typing import Any

import jax.numpy as jnp
from flax import nnx

from smallfour.config import TextConfig
from smallfour.nn import quant as quant_lib
from smallfour.nn.decoder import Transformer


def traced_params(cfg: TextConfig, param_dtype: jnp.dtype = jnp.bfloat16,
                  fp8: bool = False, quant: quant_lib.Quant | None = None) -> nnx.State:
  """The parameter state of `cfg` as ShapeDtypeStructs, by tracing the whole model.

  The reference for `abstract_params`, but jax traces in time quadratic in depth
  (0.27 s for 8 layers, 4 s for 36). `fp8`: with FP8-resident linears (`Transformer`);
  `quant`: with integer ones (`nn/quant.py`).
  """
  def make():
    model = Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, fp8=fp8)
    return model if quant is None else quant_lib.apply(model, quant)

  return nnx.state(nnx.eval_shape(make), nnx.Param)


def abstract_flat(cfg: TextConfig, param_dtype: jnp.dtype = jnp.bfloat16, fp8: bool = False,
                  quant: quant_lib.Quant | None = None) -> dict[tuple[Any, ...], nnx.Variable]:
  """{path: abstract parameter} of `cfg`, equal to `traced_params` flattened.

  A decoder layer's parameters depend only on whether it is a MoE layer, so this traces
  the model up to its first layer of each kind and repeats their entries (0.1 s for 36
  layers instead of 4).
  """
  first: dict[bool, int] = {}
  for i in range(cfg.num_layers):
    first.setdefault(cfg.is_moe_layer(i), i)
  prefix = cfg.replace(num_layers=max(first.values(), default=-1) + 1)
  traced = dict(nnx.to_flat_state(traced_params(prefix, param_dtype, fp8, quant)))
  flat = {path: var for path, var in traced.items() if path[0] != "layers"}
  for i in range(cfg.num_layers):
    like = ("layers", first[cfg.is_moe_layer(i)])
    flat.update({("layers", i) + path[2:]: copy.copy(var) for path, var in traced.items()
                 if path[:2] == like})
  return flat


def abstract_params(cfg: TextConfig, param_dtype: jnp.dtype = jnp.bfloat16,
                    fp8: bool = False, quant: quant_lib.Quant | None = None) -> nnx.State:
  """The parameter state of `cfg` as ShapeDtypeStructs (nothing allocated), built from
  `abstract_flat`."""
  return nnx.from_flat_state(abstract_flat(cfg, param_dtype, fp8, quant))


def param_counts(cfg: TextConfig) -> dict[str, Any]:
  """Total parameters, those of the text model, the vision encoder and the projector,
  and parameters active per text token (spec §1.4).

  A token runs every non-expert weight of the text model, its `num_experts_per_tok`
  routed experts and the shared experts (images run the vision path once, at prefill).
  "without embeddings" excludes the embedding table and the LM head.
  """
  groups = {"embedding": 0, "lm_head": 0, "routed_experts": 0, "other": 0,
            "vision_encoder": 0, "projector": 0}
  for path, var in nnx.to_flat_state(abstract_params(cfg)):
    if path[0] == "vision":
      key = "vision_encoder" if path[1] == "encoder" else "projector"
    elif path[0] == "embedder":
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
  vision = groups["vision_encoder"] + groups["projector"]
  return {
      "total_params": sum(groups.values()),
      "text_params": sum(groups.values()) - vision,
      "vision_encoder_params": groups["vision_encoder"],
      "projector_params": groups["projector"],
      "embedding_params": groups["embedding"],
      "lm_head_params": groups["lm_head"],
      "routed_expert_params": groups["routed_experts"],
      "active_params_per_token": {
          "without_embeddings": active,
          "with_lm_head": active + groups["lm_head"],
          "with_embeddings": active + groups["lm_head"] + groups["embedding"],
      },
  }


def expected_distinct_experts(cfg: TextConfig, batch: int) -> float:
  """Distinct routed experts `batch` tokens touch in one MoE layer, in expectation.

  Each token picks K of E experts; under uniform routing an expert is missed by all
  `batch` tokens with probability (1 - K/E)^batch.
  """
  e, k = cfg.num_experts, cfg.num_experts_per_tok
  return e * (1.0 - (1.0 - k / e) ** batch)


def decode_weight_bytes(cfg: TextConfig, batch: int, bytes_per_param: int) -> float:
  """Weight bytes one decode step of `batch` sequences must read from memory.

  Every non-routed weight and the LM head once, one embedding row per sequence, and the
  distinct routed experts the batch touches in each MoE layer
  (`expected_distinct_experts`; exactly K at batch 1). Bytes read are shared by the batch,
  which is why batched decode is cheaper per token until it turns compute-bound.
  """
  counts = param_counts(cfg)
  moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  per_expert = counts["routed_expert_params"] / max(1, moe_layers * cfg.num_experts)
  non_routed = counts["text_params"] - counts["routed_expert_params"] - counts[
      "embedding_params"]
  params = (non_routed + batch * cfg.hidden_size
            + moe_layers * expected_distinct_experts(cfg, batch) * per_expert)
  return params * bytes_per_param


def prefill_flops(cfg: TextConfig, tokens: int) -> int:
  """Matmul FLOPs a causal prefill of one `tokens`-long prompt cannot avoid.

  Every projection, attention over the T(T+1)/2 causal (query, key) pairs, the router,
  K routed experts plus the shared experts per token (a dense MLP in the first
  `first_k_dense_replace` layers), and the LM head at the last position only (all a
  prefill needs to sample). Elementwise work (norms, RoPE, softmax, SwiGLU) is not counted.
  """
  t, d, h = tokens, cfg.hidden_size, cfg.num_heads
  dq = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  projections = (d * cfg.q_lora_rank + cfg.q_lora_rank * h * dq  # q_a, q_b
                 + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # kv_a
                 + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # k_up, v_up
                 + h * cfg.v_head_dim * d)  # o_proj
  pairs = t * (t + 1) // 2
  attention = 2 * t * projections + 2 * pairs * h * (dq + cfg.v_head_dim)
  moe_width = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
  moe = 2 * t * (d * cfg.num_experts + 3 * d * moe_width)
  dense = 2 * t * 3 * d * cfg.intermediate_size
  layers = sum(moe if cfg.is_moe_layer(i) else dense for i in range(cfg.num_layers))
  return cfg.num_layers * attention + layers + 2 * d * cfg.vocab_size
