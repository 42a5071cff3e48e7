"""Integer weights end to end through the launchers: launch/convert.py --dtype=int8|int4
from an FP8 release, launch/generate.py restoring onto a (1, 4, 2) mesh, and the tiny
preset quantized at init; bad flags fail in one line."""

import json

import pytest

from smallfour.checkpoint import restore as restore_lib
from smallfour.inference.engine import Engine
from tests import checkpoints, launch_many, oracle

PROMPT = [1, 5, 7, 9, 11, 3]
MESH = "--mesh=data:1,expert:4,tensor:2"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("quant_cli")
  cfg = oracle.hf_config(num_hidden_layers=3, first_k_dense_replace=1, n_group=2,
                         topk_group=1, n_shared_experts=2, eos_token_id=255)
  checkpoints.write_native_fp8(str(root / "native"), cfg,
                               oracle.state_dict_numpy(oracle.hf_model(cfg, seed=3)),
                               with_tokenizer=False)
  return root


@pytest.fixture(scope="module")
def runs(release, tmp_path_factory):
  """Every launcher run of this file, one interpreter per launcher (tests/launch_many.py):
  the conversions (two good, one refused), then the generations (the two checkpoints and
  the preset on a mesh, two refused): two starts instead of seven."""
  tmp = tmp_path_factory.mktemp("quant_cli_runs")
  src = f"--src={release / 'native'}"
  converts = {dtype: [src, f"--dst={tmp / dtype}", f"--dtype={dtype}", "--group_size=16"]
              for dtype in ("int8", "int4")}
  converts["bad group"] = [src, f"--dst={tmp / 'x'}", "--dtype=int4", "--group_size=64"]
  out = dict(zip(converts, launch_many.run("convert.py", converts.values()), strict=True))
  generates = {f"generate {dtype}": [
      f"--ckpt={tmp / dtype}", "--prompt_ids=" + ",".join(map(str, PROMPT)),
      "--max_new_tokens=12", "--dtype=float32", MESH, f"--output_json={tmp / f'{dtype}.json'}"]
      for dtype in ("int8", "int4")}
  generates["tiny int4"] = ["--config=tiny", "--prompt_ids=1,5,7", "--max_new_tokens=8",
                            "--weights_dtype=int4", "--group_size=16", "--dense_dtype=int8",
                            MESH, f"--output_json={tmp / 'tiny.json'}"]
  generates["bad preset group"] = ["--config=tiny", "--prompt_ids=1,5,7", "--weights_dtype=int4"]
  generates["bad checkpoint group"] = [f"--ckpt={tmp / 'int4'}", "--prompt_ids=1,5",
                                       "--group_size=32"]
  out |= zip(generates, launch_many.run("generate.py", generates.values()), strict=True)
  return out, tmp


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_convert_then_generate_on_a_mesh(runs, dtype):
  outs, tmp = runs
  dst = tmp / dtype
  out = outs[dtype]
  assert out.returncode == 0, out.stderr
  meta = json.loads((dst / "smallfour_config.json").read_text())
  assert meta["param_dtype"] == dtype and meta["quant"]["group_size"] == 16
  out = outs[f"generate {dtype}"]
  assert out.returncode == 0, out.stderr
  got = json.loads((tmp / f"{dtype}.json").read_text())["token_ids"]
  model = restore_lib.restore_model(str(dst), dtype="float32")
  assert got == Engine(model, max_len=32).generate([PROMPT], 12)[0]


def test_tiny_preset_int4_on_a_mesh(runs):
  """Quantized at init inside the sharded construction. (Not compared with one device:
  the sharded init's random float32 weights differ from the eager ones in the last bit,
  which moves a few codes and the flat logits of a random model.)"""
  outs, tmp = runs
  out = outs["tiny int4"]
  assert out.returncode == 0, out.stderr
  assert len(json.loads((tmp / "tiny.json").read_text())["token_ids"]) == 8


def test_bad_flags_fail_in_one_line(runs):
  outs, tmp = runs
  bad = outs["bad group"]
  assert bad.returncode != 0 and "--group_size=64 does not divide layers.1.ffn.experts." \
      "down_proj's input dim 32" in bad.stderr.strip().splitlines()[-1]
  assert not (tmp / "x").exists()
  preset = outs["bad preset group"]
  assert preset.returncode != 0
  assert preset.stderr.strip().splitlines()[-1] == (
      "error: --group_size=128 does not divide hidden_size=64, an input dim of the routed "
      "experts; pick a divisor")
  ckpt = outs["bad checkpoint group"]
  assert ckpt.returncode != 0 and ckpt.stderr.strip().splitlines()[-1].startswith(
      f"error: {tmp / 'int4'} was quantized with --group_size=16, not 32")
