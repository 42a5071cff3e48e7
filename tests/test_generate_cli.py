"""launch/generate.py end to end: a converted float32 checkpoint reproduces the oracle."""

import json
import os
import subprocess
import sys

import pytest
import torch

from smallfour.checkpoint import convert as convert_lib
from tests import oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generate(*flags):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "generate.py"), *flags],
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mesh", ["data:1,expert:1,tensor:1", "data:1,expert:4,tensor:2"])
def test_converted_float32_checkpoint_reproduces_transformers(tmp_path, mesh):
  """Restored onto one device, or straight into its shards on a mesh (8 CPU devices)."""
  cfg = oracle.hf_config(num_hidden_layers=2, eos_token_id=255)
  hf = oracle.hf_model(cfg, seed=4)
  hf.save_pretrained(tmp_path / "hf")
  convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"), dtype="float32",
                      progress=False)
  prompt = [5, 9, 200, 17, 3, 88]
  out = _generate(f"--ckpt={tmp_path / 'ckpt'}", "--prompt_ids=" + ",".join(map(str, prompt)),
                  "--max_new_tokens=30", f"--output_json={tmp_path / 'out.json'}",
                  f"--mesh={mesh}")
  assert out.returncode == 0, out.stderr
  got = json.loads((tmp_path / "out.json").read_text())["token_ids"]
  with torch.no_grad():
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                      eos_token_id=255, pad_token_id=0)[0, len(prompt):].tolist()
  assert got == ref
  assert " ".join(map(str, got)) in out.stdout  # streamed to the terminal


def test_tiny_preset_and_bad_flags(tmp_path):
  ok = _generate("--config=tiny", "--prompt_ids=1,2,3", "--max_new_tokens=5",
                 "--temperature=0.7", "--top_k=20", "--top_p=0.9", "--seed=3",
                 f"--output_json={tmp_path / 'o.json'}")
  assert ok.returncode == 0, ok.stderr
  assert len(json.loads((tmp_path / "o.json").read_text())["token_ids"]) == 5
  for flags, message in [
      (["--temperature=-1"], "temperature must be >= 0"),
      (["--top_p=0"], "top_p must lie in (0, 1]"),
      (["--prompt_ids=1,9999"], "token ids outside [0, 512)"),
      (["--mesh=data:1,expert:x"], "expected data:D,expert:E,tensor:T"),
      (["--mesh=data:1,expert:16,tensor:1"], "needs 16 devices; 8 are available"),
      (["--mesh=data:1,expert:3,tensor:1"], "8 experts are not divisible by the expert axis"),
      (["--num_processes=2"], "need all of --coordinator_address, --num_processes"),
      (["--ckpt=/nonexistent"], "give exactly one of --ckpt and --config"),
  ]:
    bad = _generate("--config=tiny", "--prompt_ids=1,2,3", "--max_new_tokens=2", *flags)
    assert bad.returncode != 0 and message in bad.stderr, (flags, bad.stderr[-500:])
