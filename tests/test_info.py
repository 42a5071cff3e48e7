"""Parameter counts (spec §1.4) and the info command."""

import json
import os
import subprocess
import sys

import configs
from smallfour import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_release_counts():
  counts = summary.param_counts(configs.resolve("small4_119b"))
  assert counts["total_params"] == 118_972_826_624
  assert counts["routed_expert_params"] == 115_964_116_992
  assert counts["active_params_per_token"] == {
      "without_embeddings": 5_558_846_464,
      "with_lm_head": 6_095_717_376,
      "with_embeddings": 6_632_588_288,
  }


def _info(*flags):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "info.py"), *flags],
                        capture_output=True, text=True, timeout=300)


def test_info_cli(tmp_path):
  out = _info("--config=tiny")
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["total_params"] == summary.param_counts(configs.resolve("tiny"))["total_params"]

  bad = _info("--config=smol")
  assert bad.returncode != 0
  assert "--config='smol' is neither a preset" in bad.stderr + bad.stdout

  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral4"}))
  missing = _info(f"--config={tmp_path}")
  assert missing.returncode != 0
  assert "config.json: missing required field" in missing.stderr + missing.stdout
