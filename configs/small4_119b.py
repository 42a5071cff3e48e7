"""Mistral-Small-4-119B-2603: text decoder and vision path (spec ARCHITECTURE.md §1.1, §1.3)."""

from smallfour.config import RopeConfig, TextConfig, VisionConfig


def get_config() -> TextConfig:
  return TextConfig(
      vocab_size=131072,
      hidden_size=4096,
      num_layers=36,
      num_heads=32,
      q_lora_rank=1024,
      kv_lora_rank=256,
      qk_nope_head_dim=64,
      qk_rope_head_dim=64,
      v_head_dim=128,
      num_experts=128,
      num_experts_per_tok=4,
      n_shared_experts=1,
      moe_intermediate_size=2048,
      intermediate_size=12288,
      first_k_dense_replace=0,
      n_group=1,
      topk_group=1,
      norm_topk_prob=True,
      routed_scaling_factor=1.0,
      rms_norm_eps=1e-6,
      latent_norm_eps=1e-6,
      rope=RopeConfig(
          theta=10000.0,
          factor=128.0,
          original_max_position_embeddings=8192,
          beta_fast=32.0,
          beta_slow=1.0,
          mscale=1.0,
          mscale_all_dim=1.0,
          attention_factor=1.0,
          llama_4_scaling_beta=0.1,
          llama_4_original_max_position_embeddings=8192,
      ),
      # Mistral's own stack (params.json yarn.apply_scale=false); see README.
      softmax_scale_mode="plain",
      max_position_embeddings=1048576,
      # Read as Mistral's stack reads params.json: its projector norm eps and mistral-common's
      # image preprocessing (transformers' differ; see VisionConfig).
      vision=VisionConfig(
          hidden_size=1024,
          intermediate_size=4096,
          num_layers=24,
          num_heads=16,
          patch_size=14,
          image_size=1540,
          rope_theta=10000.0,
          spatial_merge_size=2,
          projector_norm_eps=1e-5,
          image_processor="mistral_common",
      ),
  )
