"""Fine-tuning runs end to end on the tiny preset: the loss falls on a small chat dataset,
a resumed run equals an uninterrupted one exactly, the merged result loads as a
checkpoint, and launch/train.py reports bad input in one line."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from smallfour import configs
from smallfour.chat import ChatTokenizer
from smallfour.checkpoint import restore
from smallfour.nn.decoder import Transformer
from smallfour.train import loop
from smallfour.train.lora import LoraConfig
from smallfour.train.optimizer import OptimizerConfig
from tests import launch_many

REPO = pathlib.Path(__file__).resolve().parent.parent
COUNTRIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Norway", "Oslo")]


def _dataset(path: pathlib.Path) -> str:
  rows = [{"messages": [{"role": "user", "content": f"Capital of {c}?"},
                        {"role": "assistant", "content": f"{k}."}]} for c, k in COUNTRIES]
  rows.append({"messages": [{"role": "system", "content": "Number only."},
                            {"role": "user", "content": "7 * 6?"},
                            {"role": "assistant", "content": "42"}]})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _config(tmp_path, out, steps, **kw):
  kw = {"batch_size": 2, "max_seq_len": 32, "progress": False,
        "optimizer": OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=40),
        **kw}
  return loop.RunConfig(data=_dataset(tmp_path / "chat.jsonl"), out=str(out), steps=steps,
                        **kw)


def _train(config):
  cfg = configs.resolve("tiny")
  return loop.train(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), cfg, ChatTokenizer.builtin(),
                    config, base={"config": "tiny", "seed": 0}, log=lambda _: None)


@pytest.mark.slow
def test_loss_falls_well_below_its_start(tmp_path):
  history = _train(_config(tmp_path, tmp_path / "run", 24, checkpoint_every=1000))
  first, last = history[0]["loss"], np.mean([r["loss"] for r in history[-3:]])
  assert last < 0.5 * first, [round(r["loss"], 2) for r in history]
  assert all(r["tokens"] > 0 for r in history)


@pytest.mark.slow
def test_resuming_equals_an_uninterrupted_run(tmp_path):
  """LoRA plus the routers, checkpoints every 2 steps; metrics files continue."""
  kw = {"lora": LoraConfig(4, ("attn", "experts")), "trainable": "lora,router",
        "checkpoint_every": 2}
  whole = _train(_config(tmp_path, tmp_path / "whole", 4, metrics=str(tmp_path / "w.jsonl"),
                         **kw))
  first = _train(_config(tmp_path, tmp_path / "split", 2, metrics=str(tmp_path / "s.jsonl"),
                         **kw))
  second = _train(_config(tmp_path, tmp_path / "split", 4, metrics=str(tmp_path / "s.jsonl"),
                          **kw))
  assert [r["step"] for r in first + second] == [1, 2, 3, 4]
  keys = ("loss", "aux_loss", "grad_norm", "learning_rate", "tokens", "expert_fractions")
  assert [{k: r[k] for k in keys} for r in whole] == [{k: r[k] for k in keys}
                                                     for r in first + second]
  lines = lambda name: [json.loads(x)["loss"] for x in (tmp_path / name).read_text().splitlines()]
  assert lines("w.jsonl") == lines("s.jsonl") == [r["loss"] for r in whole]
  # The exported (merged) models are identical and load as regular checkpoints.
  a, b = (restore.restore_model(str(tmp_path / d)) for d in ("whole", "split"))
  for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
    np.testing.assert_array_equal(x.get_value(), y.get_value(), err_msg=str(path))
  base = Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0))
  assert not np.array_equal(a.layers[0].attn.q_a_proj.get_value(),
                            base.layers[0].attn.q_a_proj.get_value())
  np.testing.assert_array_equal(a.embedder.get_value(), base.embedder.get_value())


@pytest.mark.slow
def test_a_changed_run_is_not_resumed_and_a_finished_one_exports(tmp_path):
  _train(_config(tmp_path, tmp_path / "run", 1, export=False))
  assert not (tmp_path / "run" / "params").exists()
  with pytest.raises(loop.RunError, match="batch_size: 2 then, 3 now"):
    _train(_config(tmp_path, tmp_path / "run", 2, batch_size=3))
  # The same command again trains nothing and writes the merged model.
  assert _train(_config(tmp_path, tmp_path / "run", 1)) == []
  restore.restore_model(str(tmp_path / "run"))


BAD_DATA = [
    (['{"messages": [{"role": "user", "content": "Hi"}, '
      '{"role": "assistant", "content": "Hello"}]}', '{"messages": ['],
     [], r"chat.jsonl:2: not valid JSON \(.*\) \(--bad_lines=skip skips such lines\)"),
    (['{"messages": [{"role": "user", "content": "Hi"}]}'], ["--bad_lines=skip"],
     r"chat.jsonl: nothing to train on \(1 lines, 1 skipped\)"),
    (['{"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", '
      '"tool_call_id": "x", "content": "1"}, {"role": "assistant", "content": "A"}]}'], [],
     r"chat.jsonl:1: messages\[1\].tool_call_id: 'x' answers no tool call"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """launch/train.py on each BAD_DATA file, then a good run (LoRA on a mesh), all in one
  interpreter (tests/launch_many.py); the folder of the good run."""
  cases = []
  for i, (lines, flags, _) in enumerate(BAD_DATA):
    tmp = tmp_path_factory.mktemp(f"bad_data{i}")
    (tmp / "chat.jsonl").write_text("\n".join(lines) + "\n")
    cases.append(["--config=tiny", f"--data={tmp / 'chat.jsonl'}", "--steps=1",
                  f"--out={tmp / 'run'}", *flags])
  good = tmp_path_factory.mktemp("cli_train")
  cases.append(["--config=tiny", f"--data={_dataset(good / 'chat.jsonl')}", "--steps=2",
                "--batch_size=2", "--max_seq_len=32", "--lora_rank=2", f"--out={good / 'run'}",
                f"--metrics={good / 'm.jsonl'}", "--mesh=data:1,expert:2,tensor:1"])
  return launch_many.run("train.py", cases, timeout=900), good


@pytest.mark.parametrize("i", range(len(BAD_DATA)), ids=["json", "nothing", "tool_call_id"])
def test_bad_data_fails_in_one_line(cli_runs, i):
  out, message = cli_runs[0][i], BAD_DATA[i][2]
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(message, last), out.stderr


@pytest.mark.slow
def test_cli_trains_and_generate_loads_the_result(cli_runs):
  outs, tmp_path = cli_runs
  out = outs[len(BAD_DATA)]
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["steps"] == 2
  rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and {"loss", "expert_fractions"} <= set(rows[0])
  gen = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"),
                        f"--ckpt={tmp_path / 'run'}", "--prompt=Capital of Peru?",
                        "--max_new_tokens=3"], capture_output=True, text=True, timeout=600)
  assert gen.returncode == 0, gen.stderr
  assert "tokens in" in gen.stderr
