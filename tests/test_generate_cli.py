"""launch/generate.py end to end: a converted float32 checkpoint reproduces the oracle; chat
on the tiny preset (the README's first command), dry runs, sampling defaults, clear errors."""

import json
import os
import pathlib
import random
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from smallfour.chat import ChatTokenizer
from smallfour.checkpoint import convert as convert_lib
from tests import launch_many, oracle

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "launch" / "examples"


def _generate(*flags, env=None):
  return subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), *flags],
                        capture_output=True, text=True, timeout=600,
                        env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A float32 checkpoint converted from the oracle (no tekken.json), and the oracle."""
  tmp = tmp_path_factory.mktemp("converted")
  hf = oracle.hf_model(oracle.hf_config(num_hidden_layers=2, eos_token_id=255), seed=4)
  hf.save_pretrained(tmp / "hf")
  convert_lib.convert(str(tmp / "hf"), str(tmp / "ckpt"), dtype="float32", progress=False)
  return tmp / "ckpt", hf


REPRODUCE_PROMPT = [5, 9, 200, 17, 3, 88]
MESHES = ["data:1,expert:1,tensor:1", "data:1,expert:4,tensor:2"]


@pytest.mark.parametrize("mesh", MESHES)
def test_converted_float32_checkpoint_reproduces_transformers(runs, converted, mesh):
  """Restored onto one device, or straight into its shards on a mesh (8 CPU devices).

  Library INFO logs (orbax's dozen lines per restore) show only with --verbosity."""
  _, hf = converted
  prompt = REPRODUCE_PROMPT
  verbose = mesh != MESHES[0]
  out = runs[f"reproduce {mesh}"]
  assert out.returncode == 0, out.stderr
  info_lines = re.findall(r"^I\d{4} .*$", out.stderr, re.M)
  assert bool(info_lines) == verbose, info_lines
  got = json.loads((runs.tmp / f"reproduce{MESHES.index(mesh)}.json").read_text())["token_ids"]
  with torch.no_grad():
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                      eos_token_id=255, pad_token_id=0)[0, len(prompt):].tolist()
  forced = oracle.logits(hf, np.asarray([prompt + ref]))[0, len(prompt) - 1:-1]
  oracle.assert_clear_winners(forced, ref)  # token equality must not hinge on a near-tie
  assert got == ref
  assert " ".join(map(str, got)) in out.stdout  # streamed to the terminal


def test_checkpoint_tokenizer_errors(runs):
  """Chat on a checkpoint needs its tekken.json (or --tokenizer) and one that fits it."""
  ckpt = runs.ckpt
  missing = runs["missing tokenizer"]
  assert missing.returncode != 0
  assert f"no tokenizer: {ckpt / 'tekken.json'} does not exist" in missing.stderr
  misfit = runs["misfit tokenizer"]
  assert misfit.returncode != 0 and "does not fit the model (vocab 256" in misfit.stderr


def _readme_command() -> str:
  """The README's first command (what CI runs), without its `pip install -e . && `."""
  block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("\n", 1)[0]
  install, command = block.split(" && ", 1)
  assert install == "pip install -e ." and command.startswith("python launch/generate.py ")
  return command


def test_readme_command_chats_on_a_fresh_machine(tmp_path):
  """Fresh: the built-in tokenizer file is written into an empty cache directory."""
  args = shlex.split(_readme_command())[2:]
  assert "--config=tiny" in args and any(a.startswith("--prompt=") for a in args)
  out = _generate(*args, f"--output_json={tmp_path / 'out.json'}",
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
  assert out.returncode == 0, out.stderr
  assert list((tmp_path / "cache" / "smallfour").glob("tekken_v15_*.json"))
  result = json.loads((tmp_path / "out.json").read_text())
  assert set(result) == {"prompt_ids", "token_ids", "reasoning", "content", "tool_calls",
                         "finish_reason", "cached_tokens"}
  assert result["cached_tokens"] == 0  # a fresh engine: no prefix cached yet
  tok = ChatTokenizer.builtin()
  prompt = next(a.split("=", 1)[1] for a in args if a.startswith("--prompt="))
  assert result["prompt_ids"] == tok.encode({"messages": [{"role": "user", "content": prompt}]})
  parsed = tok.parse(result["token_ids"], random.Random(0))
  for call in parsed["tool_calls"] + result["tool_calls"]:
    call.pop("id")
  assert {k: result[k] for k in parsed} == parsed
  for text in (result["reasoning"], result["content"]):
    assert text is None or text in out.stdout  # streamed to the terminal


DRY_RUNS = [
    (["--prompt=hi"], "Sampling(temperature=0.0, top_k=0, top_p=1.0), max_new_tokens=1024"),
    (["--prompt=hi", "--reasoning_effort=high"],
     "Sampling(temperature=0.7, top_k=0, top_p=1.0), max_new_tokens=8192"),
    ([f"--messages={EXAMPLES / 'weather_round_trip.json'}", "--temperature=0.2", "--top_p=0.9",
      "--max_new_tokens=64"],
     "Sampling(temperature=0.2, top_k=0, top_p=0.9), max_new_tokens=64"),
]
GOOD = ["--config=tiny", "--prompt_ids=1,2,3", "--max_new_tokens=5", "--temperature=0.7",
        "--top_k=20", "--top_p=0.9", "--seed=3"]
BAD_FLAGS = [  # each after --config=tiny --prompt_ids=1,2,3 --max_new_tokens=2; {tmp}: a folder
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--top_p=0"], "top_p must lie in (0, 1]"),
    (["--prompt_ids=1,131072"], "token ids outside [0, 131072)"),
    (["--mesh=data:1,expert:x"], "expected data:D,expert:E,tensor:T"),
    (["--mesh=data:1,expert:16,tensor:1"], "needs 16 devices; 8 are available"),
    (["--mesh=data:1,expert:3,tensor:1"], "8 experts are not divisible by the expert axis"),
    (["--num_processes=2"], "need all of --coordinator_address, --num_processes"),
    (["--ckpt=/nonexistent"], "give exactly one of --ckpt and --config"),
    (["--prompt=hi"], "give exactly one of --prompt, --messages and --prompt_ids"),
    (["--prompt_ids=", "--messages={tmp}/bad.json"],
     "messages[1].tool_call_id: 'x' answers no tool call"),
    (["--prompt_ids=", "--messages={tmp}/none.json"], "No such file"),
    (["--prompt_ids=", "--prompt=hi", "--reasoning_effort=low"],
     "flag --reasoning_effort=low: value should be one of <none|high>"),
]


class Runs(dict):
  """Named launch/generate.py runs (CompletedProcess), the folder their files went to."""
  tmp: pathlib.Path
  ckpt: pathlib.Path


@pytest.fixture(scope="module")
def runs(converted, tmp_path_factory) -> Runs:
  """The checkpoint reproducing transformers, the dry runs, the tiny preset, each bad flag
  and the tokenizer errors, all in one interpreter (tests/launch_many.py): one start
  instead of twenty-one. The quiet restore goes first, as in a fresh process: a case
  after it could only show fewer library logs, never more."""
  tmp = tmp_path_factory.mktemp("runs")
  (tmp / "bad.json").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                '{"role": "tool", "tool_call_id": "x", "content": "1"}]}')
  ckpt, _ = converted
  cases = {f"reproduce {mesh}": [
      f"--ckpt={ckpt}", "--prompt_ids=" + ",".join(map(str, REPRODUCE_PROMPT)),
      "--max_new_tokens=30", f"--output_json={tmp / f'reproduce{i}.json'}", f"--mesh={mesh}",
      *(["--verbosity=0"] if i else [])] for i, mesh in enumerate(MESHES)}
  cases |= {f"dry run {i}": ["--config=tiny", "--dry_run", *flags,
                            f"--output_json={tmp / f'dry{i}.json'}"]
           for i, (flags, _) in enumerate(DRY_RUNS)}
  cases["tiny preset"] = [*GOOD, f"--output_json={tmp / 'tiny.json'}"]
  for i, (flags, _) in enumerate(BAD_FLAGS):
    cases[f"bad flag {i}"] = ["--config=tiny", "--prompt_ids=1,2,3", "--max_new_tokens=2",
                              *(f.format(tmp=tmp) for f in flags)]
  cases["missing tokenizer"] = [f"--ckpt={ckpt}", "--prompt=hi"]
  cases["misfit tokenizer"] = [f"--ckpt={ckpt}", "--prompt=hi",
                               f"--tokenizer={ChatTokenizer.builtin().path}", "--dry_run"]
  out = Runs(zip(cases, launch_many.run("generate.py", cases.values()), strict=True))
  out.tmp, out.ckpt = tmp, ckpt
  return out


@pytest.mark.parametrize("i", range(len(DRY_RUNS)), ids=["prompt", "reasoning", "messages"])
def test_dry_run(runs, i):
  """Encodes, shows the prompt and the sampling defaults of its reasoning effort (overridable),
  writes the prompt ids; no weights."""
  flags, sampling = DRY_RUNS[i]
  out = runs[f"dry run {i}"]
  assert out.returncode == 0, out.stderr
  tok = ChatTokenizer.builtin()
  messages = next((f.split("=", 1)[1] for f in flags if f.startswith("--messages=")), None)
  request = (json.loads(pathlib.Path(messages).read_text()) if messages else
             {"messages": [{"role": "user", "content": "hi"}]})
  if "--reasoning_effort=high" in flags:
    request["reasoning_effort"] = "high"
  ids = tok.encode(request)
  assert json.loads((runs.tmp / f"dry{i}.json").read_text()) == {"prompt_ids": ids}
  assert out.stdout.splitlines()[:3] == [sampling, f"prompt: {len(ids)} tokens",
                                         ",".join(map(str, ids))]
  assert tok.render(ids) in out.stdout
  assert "tokens in" not in out.stderr  # nothing was generated


def test_tiny_preset_and_bad_flags(runs):
  ok = runs["tiny preset"]
  assert ok.returncode == 0, ok.stderr
  assert len(json.loads((runs.tmp / "tiny.json").read_text())["token_ids"]) == 5
  for i, (flags, message) in enumerate(BAD_FLAGS):
    bad = runs[f"bad flag {i}"]
    assert bad.returncode != 0 and message in bad.stderr, (flags, bad.stderr[-500:])
