"""Checkpoint tensor names -> our parameter tree (spec §6.2–6.3).

Target-centric: each `TensorMap` names one of our parameters (or one expert's slice of
it), the checkpoint tensors it is built from, their expected shapes, and the numpy
function that builds it. Weights arrive in PyTorch `[out, in]` orientation, already
dequantized; scales are the reader's job. The same maps serve the converter and every
parity test, so the tests exercise the converter's key map.

Routed experts are mapped one expert at a time (`write_index`), so that building them
never holds more than one expert's float32 transient: HF stores them fused
(`gate_up_proj [E, 2F, D]`, read one expert's gate or up rows with `read_index`), the
native format per expert (`experts.e.w1/w2/w3`).

The vision encoder and projector of a multimodal checkpoint map onto `("vision", ...)`
(`vision_maps`): HF names, or native ones whose q/k rows are permuted from adjacent-pair
to rotate-half rotary layout (spec §6.4).

Builds only rearrange elements (slices, transposes, reshapes): they commute with the
elementwise dequantization, which the converter applies after them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from smallfour.checkpoint.strided import transpose
from smallfour.config import TextConfig, VisionConfig

Path = tuple[str | int, ...]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """`param[write_index] = build(*[source[read_index] for source in sources])`.

  Either index may be None (whole tensor). `read_index` is an int or `(int, slice)`, a
  contiguous block of the source. `shapes` are the sources' full shapes, checked against
  the checkpoint's headers before anything is read.
  """

  path: Path
  sources: tuple[str, ...]
  shapes: tuple[Shape, ...]
  build: Callable[..., np.ndarray]
  read_index: int | tuple[int, slice] | None = None
  write_index: int | None = None


def _map(path: Path, source: str, shape: Shape, build: Callable[[np.ndarray], np.ndarray],
         **index: Any) -> TensorMap:
  return TensorMap(path, (source,), (shape,), build, **index)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _t(w: np.ndarray) -> np.ndarray:
  return w.T


# ---------------------------------------------------------------- shared layout


def _attention_maps(cfg: TextConfig, dst: Path, names: dict[str, str]) -> list[TensorMap]:
  """MLA weights, identical in both formats up to names (spec §2.3 shapes)."""
  d, h, q, r = cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
  dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

  def q_b(w):  # [H·(Dn+Dr), Q] -> [Q, H, Dn+Dr]
    return transpose(w).reshape(q, h, dn + dr)

  def kv_b(part):  # [H·(Dn+Dv), R] -> k_up [H, R, Dn] or v_up [H, Dv, R]
    if part == "k":
      return lambda w: w.reshape(h, dn + dv, r)[:, :dn].transpose(0, 2, 1)
    return lambda w: w.reshape(h, dn + dv, r)[:, dn:]

  def o(w):  # [D, H·Dv] -> [H, Dv, D]
    return transpose(w).reshape(h, dv, d)

  a = dst + ("attn",)
  return [
      _map(a + ("q_a_proj",), names["q_a"], (q, d), _t),
      _map(a + ("q_a_norm", "scale"), names["q_a_norm"], (q,), _same),
      _map(a + ("q_b_proj",), names["q_b"], (h * (dn + dr), q), q_b),
      _map(a + ("kv_a_proj",), names["kv_a"], (r + dr, d), _t),
      _map(a + ("kv_a_norm", "scale"), names["kv_a_norm"], (r,), _same),
      _map(a + ("k_up",), names["kv_b"], (h * (dn + dv), r), kv_b("k")),
      _map(a + ("v_up",), names["kv_b"], (h * (dn + dv), r), kv_b("v")),
      _map(a + ("o_proj",), names["o"], (d, h * dv), o),
  ]


def _swiglu_maps(dst: Path, gate: str, up: str, down: str, hidden: int,
                 width: int) -> list[TensorMap]:
  return [
      _map(dst + ("gate_proj",), gate, (width, hidden), _t),
      _map(dst + ("up_proj",), up, (width, hidden), _t),
      _map(dst + ("down_proj",), down, (hidden, width), _t),
  ]


def _global_maps(cfg: TextConfig, embed: str, norm: str, head: str) -> list[TensorMap]:
  v, d = cfg.vocab_size, cfg.hidden_size
  return [
      _map(("embedder",), embed, (v, d), _same),
      _map(("final_norm", "scale"), norm, (d,), _same),
      _map(("lm_head",), head, (v, d), _t),
  ]


# ------------------------------------------------------------------------- HF

# HF prefixes of the text model: Mistral4ForCausalLM, Mistral3 in memory, Mistral3 on disk.
HF_TEXT_PREFIXES: dict[str, tuple[str, str]] = {
    "model": ("model", "lm_head"),
    "model.language_model": ("model.language_model", "lm_head"),
    "language_model.model": ("language_model.model", "language_model.lm_head"),
}


def hf_global_maps(cfg: TextConfig, prefix: str = "model") -> list[TensorMap]:
  """Embedding, final norm and LM head under one of `HF_TEXT_PREFIXES`."""
  model, head = HF_TEXT_PREFIXES[prefix]
  return _global_maps(cfg, f"{model}.embed_tokens.weight", f"{model}.norm.weight",
                      f"{head}.weight")


def hf_layer_maps(cfg: TextConfig, layer: int, prefix: str = "model") -> list[TensorMap]:
  """The maps of decoder layer `layer` under one of `HF_TEXT_PREFIXES`."""
  src = f"{HF_TEXT_PREFIXES[prefix][0]}.layers.{layer}"
  attn, mlp, dst = f"{src}.self_attn", f"{src}.mlp", ("layers", layer)
  d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  maps = [
      _map(dst + ("input_norm", "scale"), f"{src}.input_layernorm.weight", (d,), _same),
      _map(dst + ("post_attn_norm", "scale"), f"{src}.post_attention_layernorm.weight", (d,),
           _same),
  ]
  maps += _attention_maps(cfg, dst, {
      "q_a": f"{attn}.q_a_proj.weight", "q_a_norm": f"{attn}.q_a_layernorm.weight",
      "q_b": f"{attn}.q_b_proj.weight", "kv_a": f"{attn}.kv_a_proj_with_mqa.weight",
      "kv_a_norm": f"{attn}.kv_a_layernorm.weight", "kv_b": f"{attn}.kv_b_proj.weight",
      "o": f"{attn}.o_proj.weight"})
  ffn = dst + ("ffn",)
  if not cfg.is_moe_layer(layer):
    return maps + _swiglu_maps(ffn, *(f"{mlp}.{n}_proj.weight" for n in ("gate", "up", "down")),
                               d, cfg.intermediate_size)
  maps.append(_map(ffn + ("router", "kernel"), f"{mlp}.gate.weight", (e, d), _t))
  gate_up, down = f"{mlp}.experts.gate_up_proj", f"{mlp}.experts.down_proj"
  for i in range(e):  # gate_up[i]: [2F, D], gate rows then up rows
    maps += [
        _map(ffn + ("experts", "gate_proj"), gate_up, (e, 2 * f, d), _t,
             read_index=(i, slice(0, f)), write_index=i),
        _map(ffn + ("experts", "up_proj"), gate_up, (e, 2 * f, d), _t,
             read_index=(i, slice(f, 2 * f)), write_index=i),
        _map(ffn + ("experts", "down_proj"), down, (e, d, f), _t, read_index=i, write_index=i),
    ]
  if cfg.n_shared_experts:
    shared = f"{mlp}.shared_experts"
    maps += _swiglu_maps(ffn + ("shared_experts",),
                         *(f"{shared}.{n}_proj.weight" for n in ("gate", "up", "down")),
                         d, f * cfg.n_shared_experts)
  return maps


def hf_maps(cfg: TextConfig, prefix: str = "model") -> Iterator[list[TensorMap]]:
  """All maps of an HF text model, one list per layer, then the global tensors."""
  for layer in range(cfg.num_layers):
    yield hf_layer_maps(cfg, layer, prefix)
  yield hf_global_maps(cfg, prefix)


# --------------------------------------------------------------------- native


def native_layer_maps(cfg: TextConfig, layer: int) -> list[TensorMap]:
  """Decoder layer `layer` of a Mistral-native `consolidated*.safetensors` checkpoint."""
  src, dst = f"layers.{layer}", ("layers", layer)
  d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  a = f"{src}.attention"
  maps = [
      _map(dst + ("input_norm", "scale"), f"{src}.attention_norm.weight", (d,), _same),
      _map(dst + ("post_attn_norm", "scale"), f"{src}.ffn_norm.weight", (d,), _same),
  ]
  maps += _attention_maps(cfg, dst, {
      "q_a": f"{a}.wq_a.weight", "q_a_norm": f"{a}.q_a_norm.weight", "q_b": f"{a}.wq_b.weight",
      "kv_a": f"{a}.wkv_a_with_mqa.weight", "kv_a_norm": f"{a}.kv_a_norm.weight",
      "kv_b": f"{a}.wkv_b.weight", "o": f"{a}.wo.weight"})
  ffn = dst + ("ffn",)

  def w123(prefix: str) -> tuple[str, str, str]:  # (gate, up, down) = (w1, w3, w2)
    return (f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight")

  if not cfg.is_moe_layer(layer):
    return maps + _swiglu_maps(ffn, *w123(f"{src}.feed_forward"), d, cfg.intermediate_size)
  maps.append(_map(ffn + ("router", "kernel"), f"{src}.gate.weight", (e, d), _t))
  for i in range(e):
    gate, up, down = w123(f"{src}.experts.{i}")
    maps += [
        _map(ffn + ("experts", "gate_proj"), gate, (f, d), _t, write_index=i),
        _map(ffn + ("experts", "up_proj"), up, (f, d), _t, write_index=i),
        _map(ffn + ("experts", "down_proj"), down, (d, f), _t, write_index=i),
    ]
  if cfg.n_shared_experts:
    maps += _swiglu_maps(ffn + ("shared_experts",), *w123(f"{src}.shared_experts"), d,
                         f * cfg.n_shared_experts)
  return maps


def native_maps(cfg: TextConfig) -> Iterator[list[TensorMap]]:
  """All maps of a native text model, one list per layer, then the global tensors."""
  for layer in range(cfg.num_layers):
    yield native_layer_maps(cfg, layer)
  yield _global_maps(cfg, "tok_embeddings.weight", "norm.weight", "output.weight")


# --------------------------------------------------------------------- vision

# Where a format keeps the vision tower and projector tensors: (tower, projector norm,
# patch merger, MLP in, MLP out), and its per-layer names (attention, q, k, v, o, gate,
# up, down). HF on disk and in memory; native (the projector's parts sit at the top).
_HF_VISION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj"}
_NATIVE_VISION = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3",
                  "down": "w2"}
VISION_PREFIXES: dict[str, tuple[str, str, str, str, str, dict[str, str]]] = {
    "vision_tower": ("vision_tower", "multi_modal_projector.norm",
                     "multi_modal_projector.patch_merger", "multi_modal_projector.linear_1",
                     "multi_modal_projector.linear_2", _HF_VISION),
    "model.vision_tower": ("model.vision_tower", "model.multi_modal_projector.norm",
                           "model.multi_modal_projector.patch_merger",
                           "model.multi_modal_projector.linear_1",
                           "model.multi_modal_projector.linear_2", _HF_VISION),
    "vision_encoder": ("vision_encoder", "pre_mm_projector_norm", "patch_merger",
                       "vision_language_adapter.w_in", "vision_language_adapter.w_out",
                       _NATIVE_VISION),
}


def vision_maps(cfg: TextConfig, prefix: str) -> Iterator[list[TensorMap]]:
  """The vision tower's maps, one list per encoder layer, then the patch embedding and the
  projector; `prefix` is one of `VISION_PREFIXES`."""
  v: VisionConfig = cfg.vision
  tower, norm, merger, w_in, w_out, names = VISION_PREFIXES[prefix]
  d, h, k, f, text = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size, cfg.hidden_size
  native = prefix == "vision_encoder"

  def qk(w):  # [H·K, D] -> [D, H, K]; native rows pair (2j, 2j+1), ours (j, j + K/2)
    if native:
      w = w.reshape(h, k // 2, 2, d).transpose(0, 2, 1, 3).reshape(h * k, d)
    return transpose(w).reshape(d, h, k)

  def heads_in(w):  # [H·K, D] -> [D, H, K]
    return transpose(w).reshape(d, h, k)

  def heads_out(w):  # [D, H·K] -> [H, K, D]
    return transpose(w).reshape(h, k, d)

  for j in range(v.num_layers):
    src, dst = f"{tower}.transformer.layers.{j}", ("vision", "encoder", "layers", j)
    a, ff = f"{src}.attention", f"{src}.feed_forward"
    yield [
        _map(dst + ("attention_norm", "scale"), f"{src}.attention_norm.weight", (d,), _same),
        _map(dst + ("ffn_norm", "scale"), f"{src}.ffn_norm.weight", (d,), _same),
        _map(dst + ("attention", "q_proj"), f"{a}.{names['q']}.weight", (h * k, d), qk),
        _map(dst + ("attention", "k_proj"), f"{a}.{names['k']}.weight", (h * k, d), qk),
        _map(dst + ("attention", "v_proj"), f"{a}.{names['v']}.weight", (h * k, d), heads_in),
        _map(dst + ("attention", "o_proj"), f"{a}.{names['o']}.weight", (d, h * k), heads_out),
        *_swiglu_maps(dst + ("feed_forward",), *(f"{ff}.{names[n]}.weight"
                                                 for n in ("gate", "up", "down")), d, f),
    ]
  pixels = v.num_channels * v.patch_size**2
  m2 = v.spatial_merge_size**2
  yield [
      _map(("vision", "encoder", "patch_conv"), f"{tower}.patch_conv.weight",
           (d, v.num_channels, v.patch_size, v.patch_size),
           lambda w: transpose(w.reshape(d, pixels))),
      _map(("vision", "encoder", "ln_pre", "scale"), f"{tower}.ln_pre.weight", (d,), _same),
      _map(("vision", "projector", "norm", "scale"), f"{norm}.weight", (d,), _same),
      _map(("vision", "projector", "merging_layer"), f"{merger}.merging_layer.weight",
           (d, d * m2), _t),
      _map(("vision", "projector", "linear_1"), f"{w_in}.weight", (text, d), _t),
      _map(("vision", "projector", "linear_2"), f"{w_out}.weight", (text, text), _t),
  ]
