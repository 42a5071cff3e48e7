"""The built-in Tekken v15 tokenizer file: Small 4's format on the vocabulary in mistral-common.

The released `tekken.json` is not needed to run the tiny preset with text. mistral-common's
wheel ships a Tekken vocabulary (`tekken_240911.json`) whose 130,072 ranks in use give the same
ids as the real v15 file; what it lacks is the v15 header: the control-token list with Small 4's
ids ([ARGS]=32 … [/MODEL_SETTINGS]=37), the image section and the `reasoning_effort` builder
(shared/spec/CHAT_FORMAT.md §1.5). `builtin_tekken_path` writes that file once, deterministically,
into the user's cache directory (a temporary one if that is not writable) and reuses it.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import mistral_common
from mistral_common.tokens.tokenizers.base import SpecialTokens

SOURCE = "tekken_240911.json"
RECIPE = 1  # bump when the file written below changes
NUM_SPECIAL = 1000

# Small 4's control ids (spec §1.3); every other id below NUM_SPECIAL is `<SPECIAL_i>`.
CONTROL_IDS = {
    0: SpecialTokens.unk, 1: SpecialTokens.bos, 2: SpecialTokens.eos,
    3: SpecialTokens.begin_inst, 4: SpecialTokens.end_inst,
    5: SpecialTokens.begin_tools, 6: SpecialTokens.end_tools,
    7: SpecialTokens.begin_tool_results, 8: SpecialTokens.end_tool_results,
    9: SpecialTokens.tool_calls, 10: SpecialTokens.img, 11: SpecialTokens.pad,
    12: SpecialTokens.img_break, 13: SpecialTokens.img_end,
    14: SpecialTokens.prefix, 15: SpecialTokens.middle, 16: SpecialTokens.suffix,
    17: SpecialTokens.begin_system, 18: SpecialTokens.end_system,
    19: SpecialTokens.begin_tool_content, 32: SpecialTokens.args, 33: SpecialTokens.call_id,
    34: SpecialTokens.begin_think, 35: SpecialTokens.end_think,
    36: SpecialTokens.begin_model_settings, 37: SpecialTokens.end_model_settings,
}
IMAGE = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
MODEL_SETTINGS = {"reasoning_effort": {"type": "enum", "values": ["none", "high"],
                                       "accepts_none": True, "default": "none"}}


def build(source: str | os.PathLike) -> dict:
  """The v15 file's content from a bundled Tekken file: its pattern and used ranks."""
  with open(source, encoding="utf-8") as f:
    data = json.load(f)
  config = data["config"]
  used = config["default_vocab_size"] - NUM_SPECIAL
  return {
      "config": {**config, "num_vocab_tokens": used, "default_num_special_tokens": NUM_SPECIAL,
                 "version": "v15"},
      "vocab": data["vocab"][:used],  # ranks past the id space are never used
      "special_tokens": [{"rank": i, "token_str": _token_str(i), "is_control": True}
                         for i in range(NUM_SPECIAL)],
      "image": IMAGE,
      "model_settings_builder": MODEL_SETTINGS,
  }


def _token_str(i: int) -> str:
  """`.value`, not `str()`: before mistral-common 1.13, SpecialTokens is a (str, Enum) whose
  str() is "SpecialTokens.img", not "[IMG]"."""
  return CONTROL_IDS[i].value if i in CONTROL_IDS else f"<SPECIAL_{i}>"


def builtin_tekken_path() -> pathlib.Path:
  """The built-in v15 file, written on first use (about 9 MB, 1 s) and reused after."""
  name = f"tekken_v15_small4_builtin_mc{mistral_common.__version__}_r{RECIPE}.json"
  for folder in (_cache_dir(), pathlib.Path(tempfile.gettempdir()) / f"smallfour-{os.getuid()}"):
    path = folder / name
    if path.is_file():
      return path
    try:
      folder.mkdir(parents=True, exist_ok=True)
      _write_atomically(path, build(pathlib.Path(mistral_common.__file__).parent / "data" / SOURCE))
      return path
    except OSError:
      continue
  raise OSError(f"could not write {name} to {_cache_dir()} or the temporary directory")


def _cache_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "smallfour"


def _write_atomically(path: pathlib.Path, content: dict) -> None:
  """Concurrent first uses (parallel tests, several processes) each rename a whole file."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(content, f, ensure_ascii=False)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; it holds nothing secret
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
