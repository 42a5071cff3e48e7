"""Serving plans with integer weights (`launch/info.py --plan --weights_dtype=int8|int4`):
compiled for a TPU topology by XLA:TPU (libtpu), the steps take the codes, int4 at half a
byte, as counted from shapes."""

import os
import subprocess
import sys

import pytest

from smallfour import configs
from smallfour.plan import report as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def plans():
  # Experts big enough to dominate the bytes (the tiny preset's are 0.3% of them).
  cfg = configs.resolve("tiny").replace(vocab_size=1024, hidden_size=256,
                                        moe_intermediate_size=512, intermediate_size=512)
  return {wd: plan_lib.make_plan(cfg, "v5e:2x2", weights_dtype=wd, batch=4, max_len=256,
                                 group_size=16, probe=False)
          for wd in ("bfloat16", "int8", "int4")}


def test_integer_weights_shrink_the_compiled_decode_step(plans):
  """XLA:TPU's decode arguments differ from the counted weights + page pool by the same
  few bytes (the step's other inputs) for every format: int8 codes take a byte, int4 codes
  half a byte (packed on TPU), each scale four; and they shrink with the experts, leaving
  more room for context."""
  args = {wd: p["decode"]["compiled"]["argument_bytes"] for wd, p in plans.items()}
  counted = {wd: p["decode"]["counted"]["weights_bytes"] + p["decode"]["counted"]["cache_bytes"]
             for wd, p in plans.items()}
  extra = {args[wd] - counted[wd] for wd in plans}
  assert len(extra) == 1 and 0 <= extra.pop() < 0.05 * args["int4"], (args, counted)
  assert args["int4"] < args["int8"] < args["bfloat16"]
  assert all(p["fits"] for p in plans.values())
  context = {wd: p["context_tokens_that_fit"] for wd, p in plans.items()}
  assert context["int4"] > context["int8"] > context["bfloat16"] > 0
  assert plans["int4"]["group_size"] == 16 and plans["int4"]["dense_dtype"] == "bfloat16"


def test_bad_group_size_is_a_usage_error():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "info.py"), "--config=tiny", "--plan",
       "--target=h100", "--weights_dtype=int4"], capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "--group_size=128 does not divide" in out.stderr and "Traceback" not in out.stderr
