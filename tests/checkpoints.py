"""Writers of small released-format checkpoints, built from an oracle model's weights.

* `write_mistral3_disk`: the HF multimodal repo layout of a Mistral3 model
  (`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*` on disk).
* `write_native_fp8`: params.json + consolidated.safetensors with per-expert w1/w2/w3,
  text linears quantized to e4m3 with per-tensor `qscale_weight` (+ `qscale_act`).
  Returns the dequantized weights under HF names, for the oracle to hold.
* `write_native_multimodal`: the same for a Mistral3 model, plus its vision tower and
  projector in bf16 under native names (q/k rows in the native adjacent-pair layout) and
  params.json's `vision_encoder`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from transformers import Mistral3Config, Mistral4Config

from smallfour.config import formats as config_formats

F8_MAX = 448.0


def write_hf(directory: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """config.json + two shards + model.safetensors.index.json."""
  os.makedirs(directory, exist_ok=True)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, os.path.join(directory, shard))
  index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)


_MISTRAL3_DISK = [("model.language_model.", "language_model.model."),
                  ("lm_head.", "language_model.lm_head."),
                  ("model.vision_tower.", "vision_tower."),
                  ("model.multi_modal_projector.", "multi_modal_projector.")]


def write_mistral3_disk(directory: str, config: Mistral3Config,
                        tensors: dict[str, np.ndarray]) -> None:
  """A Mistral3 model's in-memory tensors under the names its hub shards use."""
  renamed = {}
  for name, value in tensors.items():
    for memory, disk in _MISTRAL3_DISK:
      if name.startswith(memory):
        name = disk + name[len(memory):]
        break
    renamed[name] = value
  write_hf(directory, config.to_dict(), renamed)


def native_params(hf_cfg, apply_scale: bool = False) -> dict[str, Any]:
  """params.json for an oracle Mistral4Config, FP8 as released (spec §6.1)."""
  cfg = config_formats.from_hf(hf_cfg.to_dict()).replace(
      softmax_scale_mode="hf_mscale_fold" if apply_scale else "plain")
  return {**config_formats.to_params(cfg),
          "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}}


_RENAMES = [  # HF text name -> native name (regex, applied in order)
    (r"^model\.embed_tokens\.", "tok_embeddings."), (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."), (r"^model\.layers\.", "layers."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.self_attn\.q_a_proj\.", ".attention.wq_a."),
    (r"\.self_attn\.q_a_layernorm\.", ".attention.q_a_norm."),
    (r"\.self_attn\.q_b_proj\.", ".attention.wq_b."),
    (r"\.self_attn\.kv_a_proj_with_mqa\.", ".attention.wkv_a_with_mqa."),
    (r"\.self_attn\.kv_a_layernorm\.", ".attention.kv_a_norm."),
    (r"\.self_attn\.kv_b_proj\.", ".attention.wkv_b."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate\.weight$", ".gate.weight"),
    (r"\.mlp\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.mlp\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.mlp\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."), (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
]
# Kept bf16 as released (spec §6.1): embedding, LM head, norms, router.
_KEEP_BF16 = ("tok_embeddings.weight", "output.weight", "norm.weight", ".gate.weight")


def _native_relations(tensors: dict[str, np.ndarray], f: int):
  """(hf_name, index, native_name) triples: native[name] = hf[hf_name][index]."""
  for name, value in tensors.items():
    expert = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
    if expert:
      layer, kind = expert.groups()
      for e in range(value.shape[0]):
        base = f"layers.{layer}.experts.{e}"
        if kind == "down_proj":
          yield name, (e,), f"{base}.w2.weight"
        else:
          yield name, (e, slice(0, f)), f"{base}.w1.weight"
          yield name, (e, slice(f, 2 * f)), f"{base}.w3.weight"
      continue
    native = name
    for pattern, repl in _RENAMES:
      native = re.sub(pattern, repl, native)
    yield name, (), native


def write_native_fp8(directory: str, hf_cfg, tensors: dict[str, np.ndarray],
                     with_tokenizer: bool = True) -> dict[str, np.ndarray]:
  """Writes the native checkpoint; returns the dequantized weights under HF names."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  out: dict[str, np.ndarray] = {}
  dequantized = {k: np.array(v, np.float32) for k, v in tensors.items()}
  for hf_name, index, native in _native_relations(tensors, hf_cfg.moe_intermediate_size):
    w = np.asarray(tensors[hf_name][index], np.float32)
    if native.endswith(_KEEP_BF16) or w.ndim == 1:
      out[native] = w.astype(ml_dtypes.bfloat16)
      dequantized[hf_name][index] = out[native].astype(np.float32)
      continue
    scale = np.float32(np.abs(w).max() / F8_MAX)
    q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    out[native] = q
    out[native[:-len("weight")] + "qscale_weight"] = np.array(scale, np.float32)
    out[native[:-len("weight")] + "qscale_act"] = np.array(rng.random() + 0.1, np.float32)
    dequantized[hf_name][index] = q.astype(np.float32) * scale
  save_file(out, os.path.join(directory, "consolidated.safetensors"))
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(native_params(hf_cfg), f)
  if with_tokenizer:
    with open(os.path.join(directory, "tekken.json"), "w") as f:
      json.dump({"config": {"pattern": "test"}, "vocab": []}, f)
  return dequantized


_NATIVE_VISION = [  # HF Mistral3 name -> native name (regex, in order)
    (r"^model\.vision_tower\.", "vision_encoder."),
    (r"\.attention\.([qkvo])_proj\.", r".attention.w\1."),
    (r"\.feed_forward\.gate_proj\.", ".feed_forward.w1."),
    (r"\.feed_forward\.up_proj\.", ".feed_forward.w3."),
    (r"\.feed_forward\.down_proj\.", ".feed_forward.w2."),
    (r"^model\.multi_modal_projector\.norm\.", "pre_mm_projector_norm."),
    (r"^model\.multi_modal_projector\.patch_merger\.", "patch_merger."),
    (r"^model\.multi_modal_projector\.linear_1\.", "vision_language_adapter.w_in."),
    (r"^model\.multi_modal_projector\.linear_2\.", "vision_language_adapter.w_out."),
]


def write_native_multimodal(directory: str, config: Mistral3Config,
                            tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Mistral3 model as Mistral ships it natively: its text model by `write_native_fp8`,
  its vision tower and projector in bf16 in a second shard, q/k rows turned back from
  rotate-half to adjacent pairs (spec §6.4). Returns what the oracle should hold: the
  dequantized (text) and bf16-rounded (vision) weights under the model's names."""
  text_cfg = Mistral4Config(**config.text_config.to_dict())
  text = {k.replace("model.language_model.", "model.", 1): v for k, v in tensors.items()
          if k.startswith(("model.language_model.", "lm_head."))}
  held = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
          for k, v in write_native_fp8(directory, text_cfg, text).items()}
  vision = config.vision_config
  heads, head_dim = vision.num_attention_heads, vision.hidden_size // vision.num_attention_heads
  shard = {}
  for name, value in tensors.items():
    if not name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
      continue
    w = np.asarray(value, np.float32).astype(ml_dtypes.bfloat16)
    held[name] = w.astype(np.float32)
    if re.search(r"\.attention\.[qk]_proj\.weight$", name):  # rotate-half -> adjacent pairs
      w = w.reshape(heads, 2, head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)
    native = name
    for pattern, repl in _NATIVE_VISION:
      native = re.sub(pattern, repl, native)
    shard[native] = np.ascontiguousarray(w)
  save_file(shard, os.path.join(directory, "consolidated-vision.safetensors"))
  ours = config_formats.from_hf(config.to_dict())
  ours = ours.replace(softmax_scale_mode="plain", vision=ours.vision.replace(
      projector_norm_eps=1e-5, image_processor="mistral_common"))
  params = {**config_formats.to_params(ours),
            "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}}
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(params, f)
  return held
