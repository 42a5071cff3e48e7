"""The numerical oracle: transformers' Mistral4 on CPU in float32, with spread weights.

Default initialisation (std 0.02) makes router scores near-ties, so a rounding
difference could flip an expert choice. Weights here are scaled so every layer keeps
unit-scale activations and router logits have std ~3: routing has clear winners.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch
from flax import nnx
from transformers import Mistral4Config, Mistral4ForCausalLM

from smallfour import config as config_lib
from smallfour import sharding
from smallfour.checkpoint import assemble, keymap
from smallfour.nn.decoder import Transformer

# Logits match the oracle's to 1e-4 (tests/test_parity.py). A greedy winner leading by ten
# times that cannot flip under another library's, CPU's or mesh's rounding.
GREEDY_MARGIN = 1e-3


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


def ours(hf: torch.nn.Module | dict[str, np.ndarray], cfg: config_lib.TextConfig,
         mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Our float32 Transformer holding an HF model's weights (or its `state_dict_numpy`),
  placed on `mesh` by the rule table when one is given."""
  tensors = hf if isinstance(hf, dict) else state_dict_numpy(hf)
  maps = [m for group in keymap.hf_maps(cfg) for m in group]
  assert {s for m in maps for s in m.sources} == set(tensors)  # every tensor used, none invented
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assemble.load_into(model, maps, assemble.DictSource(tensors))
  return model if mesh is None else sharding.place(model, mesh)


def assert_clear_winners(logits: np.ndarray, tokens: list[int]) -> None:
  """Each of `tokens` leads every other logit of its row of `logits` [T, V] by more than
  GREEDY_MARGIN, so greedy token equality elsewhere does not hinge on a near-tie."""
  others = np.array(logits, np.float32)
  rows = np.arange(len(tokens))
  chosen = others[rows, tokens]
  others[rows, tokens] = -np.inf
  lead = chosen - others.max(-1)
  assert lead.min() > GREEDY_MARGIN, (
      f"step {lead.argmin()}: token {tokens[lead.argmin()]} leads by {lead.min():.2e}")
