"""Parameter counts (spec §1.4) and the info command."""

import json

import pytest
from flax import nnx

from smallfour import configs
from smallfour import summary
from tests import launch_many


def test_release_counts():
  counts = summary.param_counts(configs.resolve("small4_119b"))
  assert counts["text_params"] == 118_972_826_624
  assert counts["vision_encoder_params"] == 403_305_472
  assert counts["projector_params"] == 25_166_848
  assert counts["total_params"] == 119_401_298_944
  assert counts["routed_expert_params"] == 115_964_116_992
  assert counts["active_params_per_token"] == {
      "without_embeddings": 5_558_846_464,
      "with_lm_head": 6_095_717_376,
      "with_embeddings": 6_632_588_288,
  }


def test_roofline_denominators_agree_with_the_parameter_count():
  """A one-token prefill multiplies by every weight a token uses once (2 FLOPs each;
  norm scales are not matmuls), plus one (query, key) pair per head; one decode step of
  one sequence reads exactly those weights and one embedding row."""
  cfg = configs.resolve("tiny")
  active = summary.param_counts(cfg)["active_params_per_token"]["with_lm_head"]
  norms = sum(v.size for path, v in nnx.to_flat_state(summary.abstract_params(cfg))
              if any("norm" in str(p) for p in path) and path[0] != "vision")
  pair = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
  assert summary.prefill_flops(cfg, 1) == 2 * (active - norms) + 2 * pair * cfg.num_layers
  # Causal attention: the T-th token adds T (query, key) pairs per layer and head.
  grow = summary.prefill_flops(cfg, 10) - summary.prefill_flops(cfg, 9)
  assert grow == 2 * (active - norms - cfg.hidden_size * cfg.vocab_size) + (
      2 * pair * 10 * cfg.num_layers)
  assert summary.decode_weight_bytes(cfg, 1, 2) == 2 * (active + cfg.hidden_size)
  assert summary.expected_distinct_experts(cfg, 1) == cfg.num_experts_per_tok
  assert summary.expected_distinct_experts(cfg, 10_000) == pytest.approx(cfg.num_experts)
  assert (summary.decode_weight_bytes(cfg, 8, 4) < 8 * summary.decode_weight_bytes(cfg, 1, 4))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every launch/info.py run of this file, in one interpreter (tests/launch_many.py)."""
  tmp = tmp_path_factory.mktemp("info_cli")
  (tmp / "config.json").write_text(json.dumps({"model_type": "mistral4"}))
  cases = {
      "tiny": ["--config=tiny"],
      "unknown": ["--config=smol"],
      "missing field": [f"--config={tmp}"],
      "pool": ["--config=tiny", "--plan", "--target=h100", "--mesh=data:1,expert:2,tensor:1",
               "--batch=2", "--max_len=1024", "--cache_tokens=4096", "--page_size=32",
               "--max_num_batched_tokens=256", "--prefill_len=1000"],
      "bad page size": ["--config=tiny", "--plan", "--target=h100", "--page_size=24"],
  }
  return dict(zip(cases, launch_many.run("info.py", cases.values(), timeout=300),
                  strict=True))


def test_info_cli(runs):
  out = runs["tiny"]
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["total_params"] == summary.param_counts(configs.resolve("tiny"))["total_params"]

  bad = runs["unknown"]
  assert bad.returncode != 0
  assert "--config='smol' is neither a preset" in bad.stderr + bad.stdout

  missing = runs["missing field"]
  assert missing.returncode != 0
  assert "config.json: missing required field" in missing.stderr + missing.stdout


def test_info_plan_flags_size_the_pool(runs):
  """`--cache_tokens`, `--page_size`, `--max_num_batched_tokens` are the engine's: the plan
  counts that pool (whole on every device) and that prompt chunk, and says how many
  tokens of context fit; sizes the engine would refuse are usage errors."""
  out = runs["pool"]
  assert out.returncode == 0, out.stderr
  plan = json.loads(out.stdout)
  cfg = configs.resolve("tiny")
  token = 2 * cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  assert plan["pool"] == {"pages": 128, "tokens": 4096, "bytes": token * 32 * 160,
                          "bytes_per_token": token, "replicated": True}
  assert (plan["cache_tokens"], plan["page_size"], plan["max_num_batched_tokens"]) == (
      4096, 32, 256)
  assert plan["prefill_chunk_tokens"] == 256 and plan["decode"]["counted"]["cache_bytes"] \
      == plan["prefill"]["counted"]["cache_bytes"] == token * 32 * 160  # 129 pages -> 160
  context = plan["context_tokens_that_fit"]
  assert context % 32 == 0 and context > 4096
  assert "page pool of 4,096 tokens" in plan["summary"]
  assert f"context that fits beside the weights: {context:,} tokens" in plan["summary"]
  bad = runs["bad page size"]
  assert bad.returncode != 0
  assert "page_size must be a power of two" in bad.stderr and "Traceback" not in bad.stderr
