"""The text field table: where each `TextConfig` field sits in config.json and params.json.

HF paths are within a `mistral4` text config (transformers 5.23 semantics), native ones
within params.json (the semantics of Mistral's serving stack). "rope.x" is `RopeConfig.x`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from smallfour.config.fields import Field, Fixed, Key, Tokenizer
from smallfour.config.model import RopeConfig, TextConfig, yarn_mscale


def _hf_attention_factor(v: Mapping[str, Any]) -> float:  # transformers' _compute_yarn_parameters
  factor, mscale, mscale_all_dim = v["rope.factor"], v["rope.mscale"], v["rope.mscale_all_dim"]
  if mscale and mscale_all_dim:
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
  return yarn_mscale(factor, 1.0)


def _yarn_window(v: Mapping[str, Any]) -> int:
  return int(v["rope.factor"] * v["rope.original_max_position_embeddings"])


def _rope(key: str, *args, **kwargs) -> Key:
  return Key(f"rope_parameters.{key}", *args, **kwargs)


FIELDS: tuple[Field, ...] = (
    Field("vocab_size", Key("vocab_size"), Key("vocab_size")),
    Field("hidden_size", Key("hidden_size"), Key("dim")),
    Field("num_layers", Key("num_hidden_layers"), Key("n_layers")),
    Field("num_heads", Key("num_attention_heads"), Key("n_heads")),
    Field("q_lora_rank", Key("q_lora_rank"), Key("q_lora_rank")),
    Field("kv_lora_rank", Key("kv_lora_rank"), Key("kv_lora_rank")),
    Field("qk_nope_head_dim", Key("qk_nope_head_dim"), Key("qk_nope_head_dim")),
    Field("qk_rope_head_dim", Key("qk_rope_head_dim"), Key("qk_rope_head_dim")),
    Field("v_head_dim", Key("v_head_dim"), Key("v_head_dim")),
    Field("num_experts", Key("n_routed_experts"), Key("moe.num_experts")),
    Field("num_experts_per_tok", Key("num_experts_per_tok"), Key("moe.num_experts_per_tok")),
    Field("n_shared_experts", Key("n_shared_experts", 1), Key("moe.num_shared_experts", 0)),
    Field("moe_intermediate_size", Key("moe_intermediate_size"), Key("moe.expert_hidden_dim")),
    Field("intermediate_size", Key("intermediate_size", 12288), Key("hidden_dim", 0)),
    Field("first_k_dense_replace", Key("first_k_dense_replace", 0, falsy=True),
          Key("moe.first_k_dense_replace", 0)),
    Field("n_group", Key("n_group", 1, falsy=True), Key("moe.num_expert_groups", 1)),
    Field("topk_group", Key("topk_group", 1, falsy=True), Key("moe.num_expert_groups_per_tok", 1)),
    Field("norm_topk_prob", Key("norm_topk_prob", True), Fixed(True)),
    Field("routed_scaling_factor", Key("routed_scaling_factor", 1.0), Key("moe.routed_scale", 1.0)),
    Field("rms_norm_eps", Key("rms_norm_eps", 1e-6), Key("norm_eps")),
    # transformers hard-codes the q_a/kv_a norms' eps; Mistral uses norm_eps everywhere.
    Field("latent_norm_eps", Fixed(1e-6), Key("norm_eps")),
    # Configs older than transformers' rope_parameters keep rope_theta at the top.
    Field("rope.theta", Key(("rope_parameters.rope_theta", "rope_theta"), 10000.0),
          Key("rope_theta", 10000.0)),
    Field("rope.factor", _rope("factor"), Key("yarn.factor")),
    Field("rope.original_max_position_embeddings", _rope("original_max_position_embeddings"),
          Key("yarn.original_max_position_embeddings")),
    Field("rope.beta_fast", _rope("beta_fast", 32.0, falsy=True), Key("yarn.beta", 32.0)),
    Field("rope.beta_slow", _rope("beta_slow", 1.0, falsy=True), Key("yarn.alpha", 1.0)),
    # Mistral's stack never rescales cos/sin; apply_scale alone stands for m(f, 1).
    Field("rope.mscale", _rope("mscale", 0.0), Fixed(1.0)),
    Field("rope.mscale_all_dim", _rope("mscale_all_dim", 0.0), Fixed(1.0)),
    Field("rope.attention_factor", _rope("attention_factor", _hf_attention_factor), Fixed(1.0)),
    Field("rope.truncate", _rope("truncate", True), Fixed(True)),
    Field("rope.llama_4_scaling_beta", _rope("llama_4_scaling_beta"),
          Key("llama_4_scaling.beta", 0.0)),
    # HF has one original window for YaRN and the llama-4 scale alike.
    Field("rope.llama_4_original_max_position_embeddings",
          _rope("original_max_position_embeddings"),
          Key("llama_4_scaling.original_max_position_embeddings",
              lambda v: v["rope.original_max_position_embeddings"])),
    Field("max_position_embeddings", Key("max_position_embeddings", 1048576),
          Key(("max_position_embeddings", "max_seq_len"), _yarn_window)),
    Field("bos_token_id", Key("bos_token_id", 1), Tokenizer(1)),
    Field("eos_token_id", Key("eos_token_id", 2, nullable=True), Tokenizer(2)),
    Field("pad_token_id", Key("pad_token_id", 11), Tokenizer(11)),
)

# config.json fields with no TextConfig field: this model allows one value of each.
HF_CONSTANTS = {"hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
                "rope_interleave": True}
# params.json fields read outside the table (checks, the mode), and those that do not
# describe the model or describe only how it is served.
NATIVE_OTHER = ("head_dim", "n_kv_heads", "tied_embeddings", "yarn.apply_scale",
                "moe.route_every_n", "moe.expert_parallel", "moe.expert_model_parallel",
                "quantization")
# As written: model.py's annotations are strings (`from __future__ import annotations`).
TYPES = {f.name: f.type for f in dataclasses.fields(TextConfig)} | {
    f"rope.{f.name}": f.type for f in dataclasses.fields(RopeConfig)}
