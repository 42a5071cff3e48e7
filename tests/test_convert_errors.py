"""Bad converter input: each error names its culprit and leaves no checkpoint behind."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from smallfour.checkpoint import convert as convert_lib
from smallfour.checkpoint import restore as restore_lib
from smallfour.checkpoint.assemble import CheckpointError
from tests import checkpoints, oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference():
  cfg = oracle.hf_config(num_hidden_layers=2, first_k_dense_replace=1)
  return cfg, oracle.state_dict_numpy(oracle.hf_model(cfg, seed=1))


def _expect_failure(src, dst, match, **kw):
  with pytest.raises(CheckpointError, match=match):
    convert_lib.convert(str(src), str(dst), progress=False, **kw)
  assert not os.path.exists(dst)
  with pytest.raises(CheckpointError):
    restore_lib.restore_model(str(dst))


def _hf(tmp_path, reference, edit=lambda t: None):
  cfg, tensors = reference
  tensors = dict(tensors)
  edit(tensors)
  checkpoints.write_hf(str(tmp_path / "src"), cfg.to_dict(), tensors)
  return tmp_path / "src"


def test_missing_tensor(tmp_path, reference):
  src = _hf(tmp_path, reference, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
  _expect_failure(src, tmp_path / "dst", r"missing tensor model\.layers\.1\.self_attn\.o_proj")


def test_unexpected_tensor(tmp_path, reference):
  src = _hf(tmp_path, reference,
            lambda t: t.update({"model.layers.0.mlp.bogus.weight": np.zeros(3, np.float32)}))
  _expect_failure(src, tmp_path / "dst",
                  r"unexpected tensor model\.layers\.0\.mlp\.bogus\.weight in .*model-0000")


def test_wrong_shape(tmp_path, reference):
  name = "model.layers.1.mlp.experts.down_proj"
  src = _hf(tmp_path, reference, lambda t: t.update({name: t[name][:, :, :-1]}))
  _expect_failure(src, tmp_path / "dst", rf"tensor {name} has shape \(8, 64, 31\), expected")


def test_wrong_dtype(tmp_path, reference):
  name = "model.norm.weight"
  src = _hf(tmp_path, reference, lambda t: t.update({name: t[name].astype(np.int32)}))
  _expect_failure(src, tmp_path / "dst", rf"tensor {name} in .* has dtype I32")


@pytest.mark.parametrize("damage", ["truncate", "corrupt_header"])
def test_damaged_safetensors(tmp_path, reference, damage):
  src = _hf(tmp_path, reference)
  shard = src / "model-00002-of-00002.safetensors"
  data = shard.read_bytes()
  if damage == "truncate":
    shard.write_bytes(data[:len(data) // 2])
  else:
    shard.write_bytes(data[:8] + b"{" * 16 + data[24:])
  _expect_failure(src, tmp_path / "dst",
                  r"model-00002-of-00002\.safetensors: truncated or corrupt safetensors")


def test_index_names_missing_shard(tmp_path, reference):
  src = _hf(tmp_path, reference)
  os.remove(src / "model-00001-of-00002.safetensors")
  _expect_failure(src, tmp_path / "dst",
                  r"model\.safetensors\.index\.json names shard model-00001-of-00002\.safetensors")


def test_neither_format(tmp_path):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "weights.bin").write_bytes(b"\0")
  _expect_failure(tmp_path / "src", tmp_path / "dst", r"is neither an HF checkpoint")


def test_fp8_without_scale(tmp_path, reference, monkeypatch):
  cfg, tensors = reference
  checkpoints.write_native_fp8(str(tmp_path / "src"), cfg, tensors)
  from safetensors.numpy import load_file, save_file
  # safetensors' numpy loader looks the FP8 type up as numpy.float8_e4m3fn.
  monkeypatch.setattr(np, "float8_e4m3fn", ml_dtypes.float8_e4m3fn, raising=False)
  file = tmp_path / "src" / "consolidated.safetensors"
  data = load_file(str(file))
  del data["layers.0.attention.wo.qscale_weight"]
  save_file(data, str(file))
  _expect_failure(tmp_path / "src", tmp_path / "dst",
                  r"FP8 tensor layers\.0\.attention\.wo\.weight in .* has no scale tensor "
                  r"layers\.0\.attention\.wo\.qscale_weight")


def test_destination_exists(tmp_path, reference):
  src = _hf(tmp_path, reference)
  (tmp_path / "dst").mkdir()
  with pytest.raises(CheckpointError, match="already exists"):
    convert_lib.convert(str(src), str(tmp_path / "dst"), progress=False)
  assert os.listdir(tmp_path / "dst") == []


def test_checkpoint_of_another_layout_version_is_refused(tmp_path, reference):
  src = _hf(tmp_path, reference)
  convert_lib.convert(str(src), str(tmp_path / "dst"), progress=False)
  meta_file = tmp_path / "dst" / "smallfour_config.json"
  meta = json.loads(meta_file.read_text())
  assert meta["format_version"] == convert_lib.FORMAT_VERSION
  meta_file.write_text(json.dumps({**meta, "format_version": 1}))
  with pytest.raises(CheckpointError, match="format_version 1; this smallfour reads 2"):
    restore_lib.restore_model(str(tmp_path / "dst"))


def test_killed_conversion_never_restores_and_rerun_succeeds(tmp_path):
  """SIGKILL mid-way (after the first layer is on disk): nothing restores; a rerun works."""
  cfg = oracle.hf_config(num_hidden_layers=12)
  tensors = oracle.state_dict_numpy(oracle.hf_model(cfg, seed=2))
  checkpoints.write_hf(str(tmp_path / "src"), cfg.to_dict(), tensors)
  dst = tmp_path / "dst"
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "convert.py"),
                           f"--src={tmp_path / 'src'}", f"--dst={dst}", "--dtype=float32"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  data = tmp_path / "dst.partial" / "params" / "state" / "d"  # the first commit's files
  deadline = time.time() + 120
  while not (data.exists() and any(data.iterdir())) and proc.poll() is None and (
      time.time() < deadline):
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "conversion finished before it could be killed"
  assert not dst.exists()
  with pytest.raises(CheckpointError, match="did not finish"):
    restore_lib.restore_model(str(dst))
  convert_lib.convert(str(tmp_path / "src"), str(dst), dtype="float32", progress=False)
  assert not (tmp_path / "dst.partial").exists()
  model = restore_lib.restore_model(str(dst))
  np.testing.assert_array_equal(np.asarray(model.embedder[...]),
                                tensors["model.embed_tokens.weight"])


def test_cli_reports_errors(tmp_path):
  (tmp_path / "src").mkdir()
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "convert.py"),
                        f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'dst'}"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "is neither an HF checkpoint" in out.stderr
