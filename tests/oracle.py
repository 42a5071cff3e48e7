"""The numerical oracle: transformers' Mistral4 on CPU in float32, with spread weights.

Default initialisation (std 0.02) makes router scores near-ties, so a rounding
difference could flip an expert choice. Weights here are scaled so every layer keeps
unit-scale activations and router logits have std ~3: routing has clear winners.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Mistral4Config, Mistral4ForCausalLM


def hf_config(**overrides: Any) -> Mistral4Config:
  """A tiny Mistral4Config; `rope` entries override rope_parameters."""
  rope = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
              original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0,
              mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
  rope.update(overrides.pop("rope", {}))
  kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, n_group=1, topk_group=1, first_k_dense_replace=0,
            norm_topk_prob=True, routed_scaling_factor=1.0,
            rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  kw.update(overrides)
  kw.setdefault("max_position_embeddings",
                int(rope["factor"] * rope["original_max_position_embeddings"]))
  head_dim = kw["qk_rope_head_dim"] + kw["qk_nope_head_dim"]
  rope["partial_rotary_factor"] = kw["qk_rope_head_dim"] / head_dim
  return Mistral4Config(rope_parameters=rope, **kw)


def spread_weights_(model: torch.nn.Module, seed: int) -> None:
  """Re-draws every parameter in place (see module docstring)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norm scales
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
      elif name.endswith("embed_tokens.weight"):
        p.copy_(torch.randn(p.shape, generator=gen))
      elif name.endswith("mlp.gate.weight"):  # router
        p.copy_(torch.randn(p.shape, generator=gen) * 3.0 / p.shape[-1] ** 0.5)
      else:  # [out, in] linears and [E, out, in] experts
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def hf_model(config: Mistral4Config, seed: int = 0,
             plain_softmax_scale: bool = False) -> Mistral4ForCausalLM:
  """A float32 eager Mistral4ForCausalLM with spread weights.

  `plain_softmax_scale` sets every attention's scale to qk_head_dim^-1/2, i.e. what
  transformers computed before it folded YaRN's mscale² in (and Mistral's own stack).
  """
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = Mistral4ForCausalLM(config).float().eval()
  spread_weights_(model, seed)
  if plain_softmax_scale:
    for layer in model.model.layers:
      layer.self_attn.scaling = layer.self_attn.qk_head_dim ** -0.5
  return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()
