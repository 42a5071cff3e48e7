"""Per-module checks against transformers' Mistral4 pieces, to localise a mismatch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Mistral4Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mistral4 import modeling_mistral4 as hf

from smallfour.config import formats as config_formats
from smallfour.nn import rope
from smallfour.nn import paged_attention
from smallfour.nn.mla import MLA
from smallfour.nn.moe import Router
from smallfour.nn.norm import RMSNorm
from tests import oracle

ROPE_CASES = {
    "release": Mistral4Config(),
    "tiny_fold": oracle.hf_config(),
    "tiny_no_mscale_all_dim": oracle.hf_config(rope=dict(mscale_all_dim=0.0, factor=40.0)),
    "tiny_beta": oracle.hf_config(rope=dict(beta_fast=8.0, beta_slow=2.0, factor=4.0)),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_yarn_frequencies_and_tables(case):
  hf_cfg = ROPE_CASES[case]
  cfg = config_formats.from_hf(hf_cfg.to_dict())
  hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
  ours = rope.yarn_inv_freq(cfg.qk_rope_head_dim, cfg.rope)
  # numpy and torch raise theta to float32 powers with vectorised pow kernels that are within
  # 1 ulp but round per CPU (on AMD EPYC torch's lands 1 ulp off, on Intel Xeon numpy's).
  np.testing.assert_array_max_ulp(ours, hf_inv.numpy(), maxulp=2)
  assert cfg.rope.attention_factor == pytest.approx(hf_factor, rel=1e-12)

  hf_cfg._attn_implementation = "eager"
  positions = np.arange(0, 300, 7)[None]
  cos, sin = hf.Mistral4RotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32),
                                                 torch.as_tensor(positions))
  # From the reference's frequencies: one ulp of frequency times position ~300 moves a float32
  # angle by a whole ulp of the angle (~8e-6), which would swamp the tables' own error.
  our_cos, our_sin = rope.rope_tables(jnp.asarray(positions), hf_inv.numpy(),
                                      cfg.rope.attention_factor, jnp.float32)
  half = cfg.qk_rope_head_dim // 2
  np.testing.assert_allclose(our_cos, cos[..., :half].numpy(), atol=2e-6)
  np.testing.assert_allclose(our_sin, sin[..., :half].numpy(), atol=2e-6)


def test_release_frequencies_match_spec():
  inv = rope.yarn_inv_freq(64, config_formats.from_hf(Mistral4Config().to_dict()).rope)
  np.testing.assert_allclose(inv[[12, 13, 24, 25, 31]],
                             [3.162278e-02, 2.190385e-02, 8.413462e-05, 5.858549e-06,
                              1.041814e-06], rtol=1e-6)


def test_interleaved_rotation_equals_reference_up_to_pair_order():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)  # [B, H, S, Dr] torch layout
  k = rng.standard_normal((2, 1, 5, 8)).astype(np.float32)
  angles = rng.standard_normal((2, 5, 4)).astype(np.float32)
  cos, sin = np.cos(angles), np.sin(angles)
  cat = lambda a: torch.as_tensor(np.concatenate([a, a], -1))  # noqa: E731
  hq, hk = hf.apply_rotary_pos_emb_interleave(torch.as_tensor(q), torch.as_tensor(k), cat(cos),
                                              cat(sin))
  ours_q = np.asarray(rope.apply_rope(jnp.asarray(q.transpose(0, 2, 1, 3)), cos, sin))
  ours_k = np.asarray(rope.apply_rope(jnp.asarray(k[:, 0]), cos, sin))
  deinterleave = lambda x: np.concatenate([x[..., 0::2], x[..., 1::2]], -1)  # noqa: E731
  np.testing.assert_allclose(deinterleave(ours_q), hq.numpy().transpose(0, 2, 1, 3), atol=1e-6)
  np.testing.assert_allclose(deinterleave(ours_k), hk.numpy()[:, 0], atol=1e-6)


def test_llama4_query_scale():
  positions = np.array([[0, 31, 32, 63, 64, 500, 8191, 8192, 262143]])
  expected = hf.get_llama_4_attn_scale(torch.as_tensor(positions), 0.1, 32)[:, 0, :, 0]
  np.testing.assert_allclose(rope.llama4_query_scale(jnp.asarray(positions), 0.1, 32),
                             expected.numpy(), rtol=1e-7)


def test_rmsnorm():
  x = np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32) * 5
  w = np.random.default_rng(1).random(16).astype(np.float32) + 0.5
  ref = hf.Mistral4RMSNorm(16, eps=1e-5)
  ref.weight.data = torch.as_tensor(w)
  ours = RMSNorm(16, eps=1e-5, param_dtype=jnp.float32)
  ours.scale[...] = jnp.asarray(w)
  np.testing.assert_allclose(ours(jnp.asarray(x)), ref(torch.as_tensor(x)).detach().numpy(),
                             rtol=1e-6, atol=1e-6)


def _selection_lead(logits: np.ndarray, n_group: int, topk_group: int, k: int) -> float:
  """The smallest log-ratio by which a chosen group or expert beats the best one passed over.

  float32 rounds router scores by ~1e-6 relative; a lead far above that means the expert ids
  do not depend on either library's rounding.
  """
  scores = np.exp(logits - logits.max(-1, keepdims=True))
  scores /= scores.sum(-1, keepdims=True)
  groups = np.sort(scores.reshape(len(scores), n_group, -1), -1)[..., -2:].sum(-1)
  ranked_groups = np.sort(groups, -1)[:, ::-1]
  lead = np.inf
  if topk_group < n_group:
    lead = np.log(ranked_groups[:, topk_group - 1] / ranked_groups[:, topk_group]).min()
  chosen = groups >= ranked_groups[:, topk_group - 1:topk_group]
  eligible = np.where(np.repeat(chosen, scores.shape[-1] // n_group, -1), scores, 0.0)
  ranked = np.sort(eligible, -1)[:, ::-1]
  return min(lead, np.log(ranked[:, k - 1] / ranked[:, k]).min())


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_choices(groups, norm_topk_prob):
  n_group, topk_group = groups
  hf_cfg = oracle.hf_config(n_routed_experts=32, num_experts_per_tok=4, n_group=n_group,
                            topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                            routed_scaling_factor=1.7)
  cfg = config_formats.from_hf(hf_cfg.to_dict())
  ref = hf.Mistral4TopkRouter(hf_cfg)
  w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 3 / 8
  ref.weight.data = w
  x = np.random.default_rng(2).standard_normal((200, 64)).astype(np.float32)
  with torch.no_grad():
    ref_logits, ref_weights, ref_ids = ref(torch.as_tensor(x))
  assert _selection_lead(ref_logits.double().numpy(), n_group, topk_group, 4) > 1e-3
  ours = Router(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
  ours.kernel[...] = jnp.asarray(w.numpy().T)
  weights, ids = ours(jnp.asarray(x))
  order_ref, order_ours = ref_ids.argsort(-1).numpy(), np.argsort(ids, -1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), order_ours, -1),
                                np.take_along_axis(ref_ids.numpy(), order_ref, -1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order_ours, -1),
                             np.take_along_axis(ref_weights.numpy(), order_ref, -1), rtol=1e-5)


def _tiny_attention(seed=0):
  """One MLA layer loaded from an oracle model, plus the matching HF module."""
  hf_cfg = oracle.hf_config(num_hidden_layers=1, qk_nope_head_dim=16, v_head_dim=12)
  hf_model = oracle.hf_model(hf_cfg, seed=seed)
  cfg = config_formats.from_hf(hf_cfg.to_dict())
  return hf_model, oracle.ours(hf_model, cfg), cfg


def test_mla_matches_reference_layer():
  hf_model, model, cfg = _tiny_attention()
  b, s = 2, 70
  x = np.random.default_rng(3).standard_normal((b, s, cfg.hidden_size)).astype(np.float32)
  positions = np.tile(np.arange(s), (b, 1))
  mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
  with torch.no_grad():
    pe = hf_model.model.rotary_emb(torch.as_tensor(x), torch.as_tensor(positions))
    expected, _ = hf_model.model.layers[0].self_attn(
        torch.as_tensor(x), pe, mask, torch.as_tensor(positions))
  pos = model.positions(jnp.asarray(positions), jnp.float32)
  causal = jnp.asarray(np.tril(np.ones((s, s), bool))[None].repeat(b, 0))
  got = model.layers[0].attn(jnp.asarray(x), pos, causal)
  np.testing.assert_allclose(got, expected.numpy(), atol=2e-5)


def test_absorbed_equals_expanded():
  _, model, cfg = _tiny_attention(seed=1)
  attn: MLA = model.layers[0].attn
  b, s = 2, 50
  x = jnp.asarray(np.random.default_rng(4).standard_normal((b, s, cfg.hidden_size)), jnp.float32)
  pos = model.positions(jnp.broadcast_to(jnp.arange(s), (b, s)), jnp.float32)
  q_nope, q_rope = attn.queries(x, pos)
  c, k_rope = attn.latents(x, pos)
  mask = jnp.tril(jnp.ones((s, s), bool))[None].repeat(b, 0)
  expanded = attn.attend_expanded(q_nope, q_rope, c, k_rope, mask)
  absorbed = attn.attend_absorbed(q_nope, q_rope, jnp.concatenate([c, k_rope], -1), mask)
  assert float(jnp.abs(expanded).max()) > 0.1
  np.testing.assert_allclose(absorbed, expanded, atol=1e-5)


@pytest.mark.parametrize("queries", [24, 120])  # absorbed, expanded (expand_after 112 here)
def test_attend_pages_equals_the_whole_window(queries, monkeypatch):
  """A chunk's attention read block by block (4 pages of 8 per block here) equals attending
  over its whole gathered window, and never reads the blocks past its last position: they
  hold NaN."""
  monkeypatch.setattr(paged_attention, "KEY_BLOCK", 32)
  _, model, cfg = _tiny_attention(seed=2)
  attn: MLA = model.layers[0].attn
  rng = np.random.default_rng(5)
  page, width = 8, cfg.kv_lora_rank + cfg.qk_rope_head_dim
  pool = rng.standard_normal((1, 40, page * width)).astype(np.float32)
  table = rng.permutation(39)[:32][None]  # 32 pages in the table, 19 of them used
  pool[0, table[0, 20:]] = np.nan  # blocks 5-7 (pages 20-31): past the last position
  end = 19 * page
  positions = jnp.arange(end - queries, end)[None]
  q_nope = jnp.asarray(rng.standard_normal((1, queries, cfg.num_heads, cfg.qk_nope_head_dim)),
                       jnp.float32)
  q_rope = jnp.asarray(rng.standard_normal((1, queries, cfg.num_heads, cfg.qk_rope_head_dim)),
                       jnp.float32)
  assert attn.expands_for(queries) == (queries > 112)
  got = attn.attend_pages(q_nope, q_rope, jnp.asarray(pool), 0, jnp.asarray(table), positions)
  window = paged_attention.gather_pages(jnp.asarray(pool), 0, jnp.asarray(table[:, :20]), width)
  mask = jnp.arange(window.shape[1])[None, None, :] <= positions[:, :, None]
  r = cfg.kv_lora_rank
  want = attn.attend_expanded(q_nope, q_rope, window[..., :r], window[..., r:], mask)
  assert np.isfinite(np.asarray(got)).all() and float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(got, want, atol=1e-5)
