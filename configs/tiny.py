"""A tiny model with every feature of the real one, for CPU runs and tests.

Routing groups, a dense first layer, two shared experts and a short YaRN window
(original_max_position_embeddings=32) so that prompts of a few dozen tokens already
exercise the blended frequencies and the llama-4 query scale. The vision path has the
release's geometry (patch 14, 2×2 merge, longest edge 1540: the built-in tokenizer's
image layout) at tiny widths.
"""

from smallfour.config import RopeConfig, TextConfig, VisionConfig


def get_config() -> TextConfig:
  return TextConfig(
      vocab_size=131072,  # the Tekken id space, so the built-in tokenizer fits
      hidden_size=64,
      num_layers=3,
      num_heads=4,
      q_lora_rank=32,
      kv_lora_rank=16,
      qk_nope_head_dim=8,
      qk_rope_head_dim=8,
      v_head_dim=16,
      num_experts=8,
      num_experts_per_tok=2,
      n_shared_experts=1,
      moe_intermediate_size=32,
      intermediate_size=96,
      first_k_dense_replace=1,
      n_group=2,
      topk_group=1,
      norm_topk_prob=True,
      routed_scaling_factor=1.0,
      rope=RopeConfig(
          theta=10000.0,
          factor=8.0,
          original_max_position_embeddings=32,
          llama_4_scaling_beta=0.1,
          llama_4_original_max_position_embeddings=32,
      ),
      max_position_embeddings=1024,
      vision=VisionConfig(
          hidden_size=32,
          intermediate_size=64,
          num_layers=2,
          num_heads=4,
          patch_size=14,
          image_size=1540,
          projector_norm_eps=1e-5,
      ),
  )
