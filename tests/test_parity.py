"""Logit parity with transformers' Mistral4ForCausalLM (float32, CPU)."""

import jax
import numpy as np
import pytest
from flax import nnx

from smallfour.config import formats as config_formats
from tests import oracle

# Each case: (HF config overrides, patch HF to the plain softmax scale, sequence length).
# Between them: n_group/topk_group > 1, dense first layers, n_shared_experts > 1,
# routed_scaling_factor != 1, norm_topk_prob false, both softmax-scale modes, and
# sequences past original_max_position_embeddings=32 (YaRN blend + llama-4 scale).
CASES = {
    "groups_dense_shared2_fold": (
        dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
             first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=2.5), False, 80),
    "no_norm_topk_plain_attention_factor": (
        dict(norm_topk_prob=False, routed_scaling_factor=0.7, num_hidden_layers=2,
             rope=dict(mscale_all_dim=0.0, llama_4_scaling_beta=0.2)), False, 72),
    "release_like_plain": (
        dict(n_routed_experts=8, num_experts_per_tok=4, first_k_dense_replace=2,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, kv_lora_rank=24,
             rope=dict(factor=16.0)), True, 100),
    "groups3_top1_fold": (
        dict(n_routed_experts=12, num_experts_per_tok=2, n_group=3, topk_group=1,
             norm_topk_prob=False, routed_scaling_factor=1.5), False, 40),
}


@nnx.jit
def forward(model, tokens):
  return model(tokens)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
  overrides, plain, seq_len = CASES[case]
  hf_cfg = oracle.hf_config(**overrides)
  cfg = config_formats.from_hf(hf_cfg.to_dict())
  if plain:
    cfg = cfg.replace(softmax_scale_mode="plain")
  assert cfg.softmax_scale_mode == ("plain" if plain or case.startswith("no_norm") else
                                    "hf_mscale_fold")
  hf = oracle.hf_model(hf_cfg, seed=len(case), plain_softmax_scale=plain)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, seq_len))
  expected = oracle.logits(hf, tokens)
  got = np.asarray(forward(oracle.ours(hf, cfg), jax.numpy.asarray(tokens)))
  assert np.abs(expected).max() > 1.0  # logits are not trivially small
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_softmax_scale_modes_differ_except_at_position_zero():
  """The two modes are distinguishable, so the parity cases above pin the right one."""
  hf_cfg = oracle.hf_config(num_hidden_layers=1)
  hf = oracle.hf_model(hf_cfg, seed=3)
  folded = config_formats.from_hf(hf_cfg.to_dict())
  tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, 256, (1, 40)))
  a = np.asarray(forward(oracle.ours(hf, folded), tokens))
  b = np.asarray(forward(oracle.ours(hf, folded.replace(softmax_scale_mode="plain")), tokens))
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-5)
  assert np.abs(a[:, 1:] - b[:, 1:]).max() > 1e-2
