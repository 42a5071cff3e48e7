"""Config readers, presets and their errors."""

import copy
import dataclasses
import json

import pytest
from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

from smallfour import configs
from smallfour.config import files as config_files
from smallfour.config import formats as config_formats
from smallfour import config as config_lib
from smallfour.config import ConfigError
from tests import oracle

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
    "vision_encoder": {
        "hidden_size": 1024, "num_channels": 3, "image_size": 1540, "max_image_size": 1540,
        "patch_size": 14, "rope_theta": 10000.0, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_token_id": 10,
        "image_break_token_id": 12, "image_end_token_id": 13, "spatial_merge_size": 2,
        "mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": True,
        "adapter_bias": False},
}
# The release's config.json: transformers' Mistral4Config defaults in the Mistral3 wrapper,
# whose Pixtral defaults it keeps but for the activation (the converter forces silu).
RELEASE_VISION = PixtralVisionConfig(hidden_act="silu", patch_size=14, image_size=1540)
RELEASE_CONFIG = Mistral3Config(text_config=Mistral4Config().to_dict(),
                                vision_config=RELEASE_VISION.to_dict(),
                                tie_word_embeddings=False).to_dict()
# The oracle configs the converter tests build (test_convert.py, test_convert_errors.py).
ORACLE_OVERRIDES = [{}, dict(num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1,
                             n_shared_experts=2, routed_scaling_factor=1.3),
                    dict(num_hidden_layers=2, first_k_dense_replace=1)]
CONFIGS = [configs.resolve(name) for name in ("small4_119b", "tiny")] + [
    config_formats.from_hf(oracle.hf_config(**kw).to_dict()) for kw in ORACLE_OVERRIDES]
FOLD, PLAIN = "hf_mscale_fold", "plain"


def as_transformers_reads(cfg: config_lib.TextConfig) -> config_lib.TextConfig:
  """`cfg` with transformers' vision semantics: projector eps = text eps, its processor."""
  if cfg.vision is None:
    return cfg
  return cfg.replace(vision=cfg.vision.replace(projector_norm_eps=cfg.rms_norm_eps,
                                               image_processor="transformers"))


def test_presets():
  big = configs.resolve("small4_119b")
  assert big.softmax_scale == pytest.approx(128**-0.5)
  assert big.replace(softmax_scale_mode="hf_mscale_fold").softmax_scale == pytest.approx(
      0.19496949473302969, rel=1e-12)
  assert configs.resolve("tiny").first_k_dense_replace == 1


def test_native_params_json_gives_the_preset():
  assert config_formats.from_params(RELEASE_PARAMS) == configs.resolve("small4_119b")
  folded = dict(RELEASE_PARAMS, yarn=dict(RELEASE_PARAMS["yarn"], apply_scale=True))
  assert config_formats.from_params(folded).softmax_scale_mode == "hf_mscale_fold"


def test_hf_defaults_give_the_preset_with_transformers_scale():
  """transformers 5.23's Mistral4Config defaults describe the release; it folds mscale²."""
  expected = configs.resolve("small4_119b").replace(softmax_scale_mode="hf_mscale_fold")
  bare = Mistral4Config().to_dict()
  assert config_formats.from_hf(bare) == expected.replace(vision=None)
  assert config_formats.from_hf(RELEASE_CONFIG) == as_transformers_reads(expected)


def test_legacy_rope_scaling_key():
  d = Mistral4Config().to_dict()
  d["rope_scaling"] = d.pop("rope_parameters")
  assert config_formats.from_hf(d).rope == configs.resolve("small4_119b").rope


def test_round_trip_dict():
  cfg = configs.resolve("tiny")
  assert config_lib.TextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("kv_lora_rank"), "missing required field 'kv_lora_rank'"),
    (lambda d: d.update(q_lora_rank=None), "q_lora_rank is null; uncompressed queries"),
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
    config_formats.from_hf(d, "ckpt/config.json")


def test_bad_params_json_names_the_culprit():
  bad = dict(RELEASE_PARAMS, moe=dict(RELEASE_PARAMS["moe"]))
  del bad["moe"]["num_experts"]
  with pytest.raises(ConfigError, match=r"params.json:moe: missing required field 'num_experts'"):
    config_formats.from_params(bad)


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
  with pytest.raises(ConfigError,
                     match=r"--config='smol' is neither a preset \(small4_119b, tiny\)"):
    configs.resolve("smol")


def test_eos_may_be_absent():
  d = Mistral4Config().to_dict()
  d["eos_token_id"] = None
  assert config_formats.from_hf(d).eos_token_id is None


# ------------------------------------------------------------------ writers


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("mode", [PLAIN, FOLD])
def test_params_json_round_trip(cfg, mode):
  cfg = cfg.replace(softmax_scale_mode=mode)
  params = json.loads(json.dumps(config_formats.to_params(cfg)))
  # params.json leaves the token ids to tekken.json; its reader takes Mistral's.
  assert config_formats.from_params(params) == cfg.replace(bos_token_id=1, eos_token_id=2,
                                                       pad_token_id=11)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_config_json_round_trip(cfg):
  """config.json cannot say `plain` while mscale_all_dim is set: transformers folds then."""
  with pytest.raises(ConfigError, match="cannot hold softmax_scale_mode='plain' with "
                     "mscale_all_dim=1.0: transformers reads 'hf_mscale_fold'"):
    config_formats.to_hf(cfg.replace(softmax_scale_mode=PLAIN))
  cfg = as_transformers_reads(cfg.replace(softmax_scale_mode=FOLD))
  hf = json.loads(json.dumps(config_formats.to_hf(cfg)))
  assert config_formats.from_hf(hf) == cfg
  reread = Mistral3Config(**hf) if cfg.vision else Mistral4Config(**hf)
  assert config_formats.from_hf(reread.to_dict()) == cfg
  no_fold = cfg.replace(rope=dataclasses.replace(cfg.rope, mscale_all_dim=0.0),
                        softmax_scale_mode=PLAIN)
  assert config_formats.from_hf(config_formats.to_hf(no_fold)) == no_fold


@pytest.mark.parametrize("overrides", ORACLE_OVERRIDES)
def test_config_json_is_what_transformers_reads(overrides):
  want = oracle.hf_config(**overrides)
  hf = config_formats.to_hf(config_formats.from_hf(want.to_dict()))
  got = Mistral4Config(**hf)
  for key in set(hf) - {"rope_parameters"}:
    assert getattr(got, key) == getattr(want, key), key
  for key in set(hf["rope_parameters"]) & set(want.rope_parameters):
    assert got.rope_parameters[key] == want.rope_parameters[key], key


def test_writers_give_the_release_files():
  preset = configs.resolve("small4_119b")
  release = copy.deepcopy(RELEASE_PARAMS)
  del release["quantization"], release["moe"]["route_every_n"]  # no TextConfig field
  assert config_formats.to_params(preset) == release
  wrapper = config_formats.to_hf(as_transformers_reads(preset.replace(softmax_scale_mode=FOLD)))
  vision = PixtralVisionConfig(**wrapper["vision_config"]).to_dict()
  assert vision == RELEASE_VISION.to_dict()
  assert {k: wrapper[k] for k in ("image_token_index", "spatial_merge_size",
                                  "projector_hidden_act", "tie_word_embeddings")} == {
      k: RELEASE_CONFIG[k] for k in ("image_token_index", "spatial_merge_size",
                                     "projector_hidden_act", "tie_word_embeddings")}
  got = Mistral4Config(**wrapper["text_config"]).to_dict()
  want = Mistral4Config().to_dict()
  assert {k: v for k, v in got.items() if k != "rope_parameters"} == {
      k: v for k, v in want.items() if k != "rope_parameters"}
  common = set(got["rope_parameters"]) & set(want["rope_parameters"])
  assert {k: got["rope_parameters"][k] for k in common} == {
      k: want["rope_parameters"][k] for k in common}


@pytest.mark.parametrize("writer, change, message", [
    ("to_params", dict(latent_norm_eps=1e-5),
     "params.json holds rms_norm_eps and latent_norm_eps in one field, norm_eps"),
    ("to_params", dict(norm_topk_prob=False), "params.json cannot hold norm_topk_prob=False"),
    ("to_params", dict(rope=dict(attention_factor=1.2)),
     r"params.json cannot hold rope.attention_factor=1.2 \(its readers assume 1.0\)"),
    ("to_hf", dict(latent_norm_eps=1e-5), "config.json cannot hold latent_norm_eps=1e-05"),
    ("to_hf", dict(rope=dict(llama_4_original_max_position_embeddings=4096)),
     "holds rope.original_max_position_embeddings and "
     "rope.llama_4_original_max_position_embeddings in one field"),
    ("to_hf", dict(rope=dict(beta_fast=0.0)),
     r"cannot hold rope.beta_fast=0.0 \(read back as 32.0"),
])
def test_writers_refuse_what_their_format_cannot_hold(writer, change, message):
  cfg = configs.resolve("small4_119b").replace(softmax_scale_mode=FOLD, vision=None)
  if "rope" in change:
    change = dict(rope=dataclasses.replace(cfg.rope, **change["rope"]))
  with pytest.raises(ConfigError, match=message):
    getattr(config_formats, writer)(cfg.replace(**change))


# ------------------------------------------------------- params.json details


def _params(**changes):
  params = copy.deepcopy(RELEASE_PARAMS)
  for path, value in changes.items():
    *parents, leaf = path.split("__")
    node = params
    for part in parents:
      node = node[part]
    if value is None:
      del node[leaf]
    else:
      node[leaf] = value
  return params


def test_params_json_defaults():
  preset = configs.resolve("small4_119b")
  # No apply_scale: plain, as Mistral's stack reads it.
  assert config_formats.from_params(_params(yarn__apply_scale=None)) == preset
  with pytest.raises(ConfigError, match="params.json:yarn: apply_scale='false' is not true"):
    config_formats.from_params(_params(yarn__apply_scale="false"))
  # No context length: YaRN's window (factor x original), or the older max_seq_len.
  small = _params(max_position_embeddings=None, yarn__factor=4)
  assert config_formats.from_params(small).max_position_embeddings == 4 * 8192
  small["max_seq_len"] = 1000
  assert config_formats.from_params(small).max_position_embeddings == 1000
  with pytest.raises(ConfigError, match=r"params.json:moe: route_every_n=2 is not supported"):
    config_formats.from_params(_params(moe__route_every_n=2))


def test_params_json_unknown_fields_warn(recwarn):
  config_formats.from_params(dict(RELEASE_PARAMS,
                                  moe=dict(RELEASE_PARAMS["moe"], expert_parallel=1)))
  assert not recwarn.list  # the release's other fields are known
  with pytest.warns(UserWarning, match=r"params.json: ignoring unknown fields lora, moe.jitter, "
                    r"vision_encoder.video"):
    config_formats.from_params(_params(lora={"rank": 8}, moe__jitter=0.1,
                                       vision_encoder__video=True))


# ------------------------------------------------------- the hub's two files


def test_hub_pair_reads_as_mistral():
  preset = configs.resolve("small4_119b")
  assert config_formats.from_hub(RELEASE_CONFIG, RELEASE_PARAMS) == preset
  folded = _params(yarn__apply_scale=True)
  assert config_formats.from_hub(RELEASE_CONFIG, folded).softmax_scale_mode == FOLD
  # Token ids come from config.json, and a context length params.json leaves out.
  hf = Mistral4Config(pad_token_id=0, max_position_embeddings=262144).to_dict()
  got = config_formats.from_hub(hf, _params(max_position_embeddings=None, vision_encoder=None))
  assert (got.pad_token_id, got.max_position_embeddings) == (0, 262144)


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=35), "disagree on num_layers: n_layers=36 vs num_hidden_layers=35"),
    (dict(n_routed_experts=64), "disagree on num_experts: moe.num_experts=128 vs n_routed_exp"),
    (dict(max_position_embeddings=262144), "disagree on max_position_embeddings"),
    # transformers' plain-scale workaround also rescales cos/sin, which Mistral's stack does not.
    (dict(rope=dict(mscale_all_dim=0.0)), "disagree on rope.attention_factor: \\(implied\\)=1.0"),
    (dict(rope=dict(llama_4_scaling_beta=0.0)), "disagree on rope.llama_4_scaling_beta"),
])
def test_hub_pair_must_agree(change, message):
  hf = Mistral4Config().to_dict()
  hf["rope_parameters"].update(change.pop("rope", {}))
  hf.update(change)
  with pytest.raises(ConfigError, match=f"params.json and config.json {message}"):
    config_formats.from_hub(hf, _params(vision_encoder=None))


def test_directory_with_both_files(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(RELEASE_CONFIG))
  assert configs.resolve(str(tmp_path)).softmax_scale_mode == FOLD  # config.json alone
  (tmp_path / "params.json").write_text(json.dumps(RELEASE_PARAMS))
  assert configs.resolve(str(tmp_path)) == configs.resolve("small4_119b")
  note = config_files.read_release_dir(str(tmp_path)).describe()
  assert note == ("config from params.json, cross-checked with config.json; "
                  "softmax_scale_mode=plain: params.json yarn.apply_scale=false; "
                  "image_processor=mistral_common")
