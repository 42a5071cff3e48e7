"""Config readers, presets and their errors."""

import json

import pytest
from transformers import Mistral3Config, Mistral4Config

from smallfour import configs
from smallfour import config as config_lib
from smallfour.config import ConfigError

# The release's params.json as spec §6.1 reconstructs it.
RELEASE_PARAMS = {
    "dim": 4096, "n_layers": 36, "head_dim": 128, "hidden_dim": 12288, "n_heads": 32,
    "n_kv_heads": 32, "rope_theta": 10000.0, "norm_eps": 1e-6, "vocab_size": 131072,
    "max_position_embeddings": 1048576, "tied_embeddings": False, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "kv_lora_rank": 256, "v_head_dim": 128,
    "llama_4_scaling": {"beta": 0.1, "original_max_position_embeddings": 8192},
    "yarn": {"factor": 128, "original_max_position_embeddings": 8192, "beta": 32, "alpha": 1,
             "apply_scale": False},
    "moe": {"first_k_dense_replace": 0, "num_experts": 128, "num_experts_per_tok": 4,
            "num_expert_groups": 1, "num_expert_groups_per_tok": 1, "routed_scale": 1.0,
            "expert_hidden_dim": 2048, "num_shared_experts": 1, "route_every_n": 1},
    "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"},
}


def test_presets():
  big = configs.resolve("small4_119b")
  assert big.softmax_scale == pytest.approx(128**-0.5)
  assert big.replace(softmax_scale_mode="hf_mscale_fold").softmax_scale == pytest.approx(
      0.19496949473302969, rel=1e-12)
  assert configs.resolve("tiny").first_k_dense_replace == 1


def test_native_params_json_gives_the_preset():
  assert config_lib.from_params(RELEASE_PARAMS) == configs.resolve("small4_119b")
  folded = dict(RELEASE_PARAMS, yarn=dict(RELEASE_PARAMS["yarn"], apply_scale=True))
  assert config_lib.from_params(folded).softmax_scale_mode == "hf_mscale_fold"


def test_hf_defaults_give_the_preset_with_transformers_scale():
  """transformers 5.23's Mistral4Config defaults describe the release; it folds mscale²."""
  expected = configs.resolve("small4_119b").replace(softmax_scale_mode="hf_mscale_fold")
  bare = Mistral4Config().to_dict()
  assert config_lib.from_hf(bare) == expected
  wrapped = Mistral3Config(text_config=Mistral4Config().to_dict(),
                           tie_word_embeddings=False).to_dict()
  assert config_lib.from_hf(wrapped) == expected


def test_legacy_rope_scaling_key():
  d = Mistral4Config().to_dict()
  d["rope_scaling"] = d.pop("rope_parameters")
  assert config_lib.from_hf(d).rope == configs.resolve("small4_119b").rope


def test_round_trip_dict():
  cfg = configs.resolve("tiny")
  assert config_lib.TextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("kv_lora_rank"), "missing required field 'kv_lora_rank'"),
    (lambda d: d.update(n_group=3), "n_routed_experts=128 is not divisible by n_group=3"),
    (lambda d: d.update(n_group=8, topk_group=1, num_experts_per_tok=17),
     "num_experts_per_tok=17 exceeds the 16 experts"),
    (lambda d: d.update(topk_group=2), "topk_group=2 exceeds n_group=1"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (lambda d: d.update(num_key_value_heads=8), "num_key_value_heads=8 must equal"),
    (lambda d: d.update(qk_rope_head_dim=63), "qk_rope_head_dim must be even"),
    (lambda d: d["rope_parameters"].update(partial_rotary_factor=0.25),
     "partial_rotary_factor=0.25 does not give qk_rope_head_dim=64"),
    (lambda d: d.update(model_type="llama"), "model_type='llama'"),
    (lambda d: d["rope_parameters"].update(rope_type="linear"), "only 'yarn'"),
    (lambda d: d["rope_parameters"].pop("factor"), "rope_parameters: missing required field"),
    (lambda d: d.update(first_k_dense_replace=40), "first_k_dense_replace=40"),
])
def test_bad_hf_config_names_the_culprit(mutate, message):
  d = Mistral4Config().to_dict()
  mutate(d)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.from_hf(d, "ckpt/config.json")


def test_bad_params_json_names_the_culprit():
  bad = dict(RELEASE_PARAMS, moe=dict(RELEASE_PARAMS["moe"]))
  del bad["moe"]["num_experts"]
  with pytest.raises(ConfigError, match=r"params.json:moe: missing required field 'num_experts'"):
    config_lib.from_params(bad)


def test_resolve_directories(tmp_path):
  (tmp_path / "params.json").write_text(json.dumps(RELEASE_PARAMS))
  assert configs.resolve(str(tmp_path)) == configs.resolve("small4_119b")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="config.json: not valid JSON"):
    configs.resolve(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError, match="no smallfour_config.json, config.json or params.json"):
    configs.resolve(str(empty))


def test_unknown_preset():
  with pytest.raises(ConfigError, match=r"--config='smol' is neither a preset \(small4_119b, tiny\)"):
    configs.resolve("smol")


def test_eos_may_be_absent():
  d = Mistral4Config().to_dict()
  d["eos_token_id"] = None
  assert config_lib.from_hf(d).eos_token_id is None
