"""Recognises a released checkpoint directory (HF or Mistral-native) and checks it whole.

The tensors' kind and the config are decided apart: `auto` reads HF tensors when both
kinds are there, while params.json, when present, gives the config and its softmax scale
(`smallfour.config.files.read_release_dir`). `open_checkpoint` reads only JSON and
safetensors headers; `validate` then proves that every tensor the model needs is present
with the right shape and a float dtype, and that no tensor is left unaccounted for,
before a single weight is read.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Literal

from smallfour import config as config_lib
from smallfour.config import files as config_files
from smallfour.checkpoint import keymap
from smallfour.checkpoint.assemble import CheckpointError, check_shapes
from smallfour.checkpoint.safetensors_source import SafetensorsSource

Kind = Literal["hf", "native"]

# The vision tower and projector's tensors: converted when the config has a vision part,
# recognised and skipped (a text-only conversion) when it has none.
_VISION_PREFIXES = {
    "hf": ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
           "model.multi_modal_projector."),
    "native": ("vision_encoder.", "vision_language_adapter.", "patch_merger.",
               "pre_mm_projector_norm."),
}


def _hf_scale(name: str) -> str:  # x.weight -> x.weight_scale_inv; experts.gate_up_proj -> .._scale_inv
  return name + "_scale_inv"


def _hf_activation_scale(name: str) -> str:
  return name[:-len(".weight")] + ".activation_scale" if name.endswith(".weight") else (
      name + "_activation_scale")


def _native_scale(name: str) -> str:
  return name[:-len("weight")] + "qscale_weight"


def _native_activation_scale(name: str) -> str:
  return name[:-len("weight")] + "qscale_act"


@dataclasses.dataclass
class SourceCheckpoint:
  """A released checkpoint: its config, tensors and how they map onto our tree."""

  kind: Kind
  directory: str
  config: config_lib.TextConfig
  source: SafetensorsSource
  maps: list[list[keymap.TensorMap]]  # one list per decoder layer, then the globals
  tokenizer: str | None  # path of tekken.json, if shipped
  config_note: str  # which JSON files gave the config, and what set its softmax scale

  def validate(self) -> None:
    """Raises CheckpointError naming the first missing, unexpected or malformed tensor."""
    self.source.check_dtypes()
    needed = {name for group in self.maps for m in group for name in m.sources}
    for name in sorted(needed):
      if name not in self.source.location:
        raise CheckpointError(f"{self.directory}: missing tensor {name}")
    for group in self.maps:
      check_shapes(group, self.source)
    act_scale = _hf_activation_scale if self.kind == "hf" else _native_activation_scale
    aux = {f(name) for name in needed for f in (self.source.scale_name, act_scale)}
    vision = _VISION_PREFIXES[self.kind] if self.config.vision is None else ()
    skipped = {n for n in self.source.location if n.startswith(vision)} if vision else set()
    unexpected = sorted(set(self.source.location) - needed - aux - skipped)
    if unexpected:
      where = self.source.location[unexpected[0]]
      raise CheckpointError(f"unexpected tensor {unexpected[0]} in {where} "
                            f"({len(unexpected)} unexpected in all)")
    if skipped:
      logging.warning("%d vision tensors are not converted: the config describes no vision "
                      "encoder (text model only)", len(skipped))


def detect_kind(directory: str) -> Kind:
  has = lambda pattern: bool(glob.glob(os.path.join(directory, pattern)))  # noqa: E731
  if has("config.json") and (has("model*.safetensors") or has("model.safetensors.index.json")):
    return "hf"
  if has("params.json") and has("consolidated*.safetensors"):
    return "native"
  raise CheckpointError(
      f"{directory} is neither an HF checkpoint (config.json + model*.safetensors) nor a "
      "Mistral-native one (params.json + consolidated*.safetensors)")


def _source(directory: str, kind: Kind) -> SafetensorsSource:
  scale = _hf_scale if kind == "hf" else _native_scale
  stem = "model" if kind == "hf" else "consolidated"
  index = os.path.join(directory, f"{stem}.safetensors.index.json")
  if os.path.exists(index):
    return SafetensorsSource.from_index(index, scale)
  return SafetensorsSource(sorted(glob.glob(os.path.join(directory, f"{stem}*.safetensors"))),
                           scale)


def _hf_prefix(source: SafetensorsSource, directory: str) -> str:
  for prefix, (model, _) in keymap.HF_TEXT_PREFIXES.items():
    if f"{model}.embed_tokens.weight" in source.location:
      return prefix
  looked = ", ".join(f"{m}.embed_tokens.weight" for m, _ in keymap.HF_TEXT_PREFIXES.values())
  raise CheckpointError(f"{directory}: missing tensor: no text embedding found (looked for {looked})")


def _vision_prefix(source: SafetensorsSource, kind: Kind) -> str:
  """The `keymap.VISION_PREFIXES` entry the tensors use (HF: in-memory names, else disk)."""
  if kind == "native":
    return "vision_encoder"
  return ("model.vision_tower" if "model.vision_tower.patch_conv.weight" in source.location
          else "vision_tower")


def open_checkpoint(directory: str, kind: Kind | Literal["auto"] = "auto") -> SourceCheckpoint:
  """Reads the config and the safetensors headers of `directory` (nothing else)."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is not a directory")
  kind = detect_kind(directory) if kind == "auto" else kind
  release = config_files.read_release_dir(directory)
  cfg = release.config
  source = _source(directory, kind)
  if kind == "hf":
    maps = list(keymap.hf_maps(cfg, _hf_prefix(source, directory)))
  else:
    maps = list(keymap.native_maps(cfg))
  if cfg.vision is not None:
    maps += list(keymap.vision_maps(cfg, _vision_prefix(source, kind)))
  tokenizer = os.path.join(directory, "tekken.json")
  return SourceCheckpoint(kind, directory, cfg, source, maps,
                          tokenizer if os.path.exists(tokenizer) else None, release.describe())
