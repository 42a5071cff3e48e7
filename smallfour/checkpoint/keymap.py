"""Checkpoint tensor names -> our parameter tree (spec §6.2–6.3).

Target-centric: each `TensorMap` names one of our parameters, the checkpoint tensors it
is built from, and the (pure numpy) function that builds it. Weights arrive in
PyTorch `[out, in]` orientation and already dequantized; scales are the reader's job.
The same maps serve the converter and every parity test, so the tests exercise the
converter's key map.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from smallfour.config import TextConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Our parameter at `path` is `build(*[checkpoint[name] for name in sources])`.

  `shapes` are the shapes the sources must have, checked before anything is built.
  """

  path: Path
  sources: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  build: Callable[..., np.ndarray]


def _one(path: Path, source: str, shape: tuple[int, ...],
         build: Callable[[np.ndarray], np.ndarray]) -> TensorMap:
  return TensorMap(path, (source,), (shape,), build)


# HF prefixes of the text model: Mistral4ForCausalLM, Mistral3 in memory, Mistral3 on disk.
HF_TEXT_PREFIXES: dict[str, tuple[str, str]] = {
    "model": ("model", "lm_head"),
    "model.language_model": ("model.language_model", "lm_head"),
    "language_model.model": ("language_model.model", "language_model.lm_head"),
}


def _transpose(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def hf_global_maps(cfg: TextConfig, prefix: str = "model") -> list[TensorMap]:
  """Embedding, final norm and LM head under one of `HF_TEXT_PREFIXES`."""
  model, head = HF_TEXT_PREFIXES[prefix]
  v, d = cfg.vocab_size, cfg.hidden_size
  return [
      _one(("embedder",), f"{model}.embed_tokens.weight", (v, d), _identity),
      _one(("final_norm", "scale"), f"{model}.norm.weight", (d,), _identity),
      _one(("lm_head",), f"{head}.weight", (v, d), _transpose),
  ]


def hf_layer_maps(cfg: TextConfig, layer: int, prefix: str = "model") -> list[TensorMap]:
  """The maps of decoder layer `layer` under one of `HF_TEXT_PREFIXES`."""
  src = f"{HF_TEXT_PREFIXES[prefix][0]}.layers.{layer}"
  d, h, q, r = cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
  dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  e, f = cfg.num_experts, cfg.moe_intermediate_size

  def q_b(w):  # [H·(Dn+Dr), Q] -> [Q, H, Dn+Dr]
    return np.ascontiguousarray(w.T.reshape(q, h, dn + dr))

  def kv_b(part):  # [H·(Dn+Dv), R] -> k_up [R, H, Dn] or v_up [R, H, Dv]
    sl = slice(0, dn) if part == "k" else slice(dn, dn + dv)
    return lambda w: np.ascontiguousarray(w.reshape(h, dn + dv, r)[:, sl].transpose(2, 0, 1))

  def o(w):  # [D, H·Dv] -> [H, Dv, D]
    return np.ascontiguousarray(w.T.reshape(h, dv, d))

  def gate_up(part):  # [E, 2F, D] -> [E, D, F]
    sl = slice(0, f) if part == "gate" else slice(f, 2 * f)
    return lambda w: np.ascontiguousarray(w[:, sl].transpose(0, 2, 1))

  def experts_down(w):  # [E, D, F] -> [E, F, D]
    return np.ascontiguousarray(w.transpose(0, 2, 1))

  dst: Path = ("layers", layer)
  attn, kv_b_name = f"{src}.self_attn", f"{src}.self_attn.kv_b_proj.weight"
  maps = [
      _one(dst + ("input_norm", "scale"), f"{src}.input_layernorm.weight", (d,), _identity),
      _one(dst + ("post_attn_norm", "scale"), f"{src}.post_attention_layernorm.weight", (d,),
           _identity),
      _one(dst + ("attn", "q_a_proj"), f"{attn}.q_a_proj.weight", (q, d), _transpose),
      _one(dst + ("attn", "q_a_norm", "scale"), f"{attn}.q_a_layernorm.weight", (q,), _identity),
      _one(dst + ("attn", "q_b_proj"), f"{attn}.q_b_proj.weight", (h * (dn + dr), q), q_b),
      _one(dst + ("attn", "kv_a_proj"), f"{attn}.kv_a_proj_with_mqa.weight", (r + dr, d),
           _transpose),
      _one(dst + ("attn", "kv_a_norm", "scale"), f"{attn}.kv_a_layernorm.weight", (r,),
           _identity),
      _one(dst + ("attn", "k_up"), kv_b_name, (h * (dn + dv), r), kv_b("k")),
      _one(dst + ("attn", "v_up"), kv_b_name, (h * (dn + dv), r), kv_b("v")),
      _one(dst + ("attn", "o_proj"), f"{attn}.o_proj.weight", (d, h * dv), o),
  ]
  mlp = f"{src}.mlp"
  if not cfg.is_moe_layer(layer):
    return maps + _swiglu_maps(dst + ("ffn",), mlp, d, cfg.intermediate_size)
  gate_up_name = f"{mlp}.experts.gate_up_proj"
  maps += [
      _one(dst + ("ffn", "router", "kernel"), f"{mlp}.gate.weight", (e, d), _transpose),
      _one(dst + ("ffn", "experts", "gate_proj"), gate_up_name, (e, 2 * f, d), gate_up("gate")),
      _one(dst + ("ffn", "experts", "up_proj"), gate_up_name, (e, 2 * f, d), gate_up("up")),
      _one(dst + ("ffn", "experts", "down_proj"), f"{mlp}.experts.down_proj", (e, d, f),
           experts_down),
  ]
  if cfg.n_shared_experts:
    maps += _swiglu_maps(dst + ("ffn", "shared_experts"), f"{mlp}.shared_experts", d,
                         f * cfg.n_shared_experts)
  return maps


def _swiglu_maps(dst: Path, src: str, hidden: int, width: int) -> list[TensorMap]:
  shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
  return [_one(dst + (f"{name}_proj",), f"{src}.{name}_proj.weight", shape, _transpose)
          for name, shape in shapes.items()]


def hf_maps(cfg: TextConfig, prefix: str = "model") -> Iterator[list[TensorMap]]:
  """All maps of an HF text model, one list per layer, then the global tensors."""
  for layer in range(cfg.num_layers):
    yield hf_layer_maps(cfg, layer, prefix)
  yield hf_global_maps(cfg, prefix)
