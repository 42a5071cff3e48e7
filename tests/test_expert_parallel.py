"""Expert parallelism: the same numbers on every mesh, MoE implementation and process count."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smallfour import configs
from smallfour.config import formats as config_formats
from smallfour import sharding
from smallfour.checkpoint import convert as convert_lib
from smallfour.inference.engine import Engine
from smallfour.inference.paged import PagedModel
from smallfour.nn import expert_parallel, moe, moe_kernels
from smallfour.nn.decoder import Transformer
from tests import oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ["data:1,expert:1,tensor:1", "data:1,expert:8,tensor:1", "data:2,expert:4,tensor:1",
          "data:1,expert:4,tensor:2"]
PROMPTS = [list(range(3, 33)), [7, 1, 99, 4, 250, 31, 8], [5] * 12]


@pytest.fixture(scope="module")
def hf_and_cfg():
  """A transformers model (8 experts in 2 groups, a dense first layer) and our config."""
  hf_cfg = oracle.hf_config(first_k_dense_replace=1, n_group=2, topk_group=1,
                            eos_token_id=None)
  hf = oracle.hf_model(hf_cfg, seed=21)
  return hf, config_formats.from_hf(hf_cfg.to_dict())


def _mesh(spec: str, cfg) -> jax.sharding.Mesh:
  return sharding.make_mesh(sharding.parse_mesh(spec), cfg)


def _forward(model: Transformer, tokens: np.ndarray, mesh) -> np.ndarray:
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  with jax.set_mesh(mesh):
    return np.asarray(run(state, jnp.asarray(tokens)))


@pytest.mark.parametrize("spec", MESHES[1:])
@pytest.mark.parametrize("tokens, route", [(1, "random"), (13, "random"), (64, "random"),
                                           (24, "one_expert")])
def test_expert_parallel_kernel_equals_dense_oracle(spec, tokens, route):
  """Token counts that do not divide the mesh (1, 13) are padded with rows that own nothing."""
  e, d, f, k = 8, 32, 16, 2
  rng = np.random.default_rng(tokens)
  gate, up = (rng.standard_normal((e, d, f), np.float32) / d**0.5 for _ in range(2))
  down = rng.standard_normal((e, f, d), np.float32) / f**0.5
  x = rng.standard_normal((tokens, d), np.float32)
  weights = rng.random((tokens, k), np.float32)
  ids = (np.full((tokens, k), 5) if route == "one_expert" else
         np.stack([rng.permutation(e)[:k] for _ in range(tokens)])).astype(np.int32)
  want = moe_kernels.dense(gate, up, down, x, weights, ids)
  mesh = _mesh(spec, None)
  w_in = sharding.logical_sharding(expert_parallel.IN_WEIGHT_AXES, gate.shape, mesh)
  w_out = sharding.logical_sharding(expert_parallel.OUT_WEIGHT_AXES, down.shape, mesh)
  args = (jax.device_put(gate, w_in), jax.device_put(up, w_in), jax.device_put(down, w_out),
          x, weights, ids)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: expert_parallel.routed_experts(*a, mesh=mesh))(*args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_logits_equal_on_every_mesh_and_moe_implementation(hf_and_cfg):
  """Teacher-forced logits: transformers = each single-device kernel = each mesh (EP)."""
  hf, cfg = hf_and_cfg
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
  want = oracle.logits(hf, tokens)
  single = oracle.ours(hf, cfg)
  results = {}
  for impl in ["dense_oracle", "ragged_dot", "sorted_blocks", "gather"]:
    moe.set_impl(single, impl)
    results[f"1 device, {impl}"] = _forward(single, tokens, _mesh(MESHES[0], cfg))
  for spec in MESHES[1:]:
    mesh = _mesh(spec, cfg)
    model = oracle.ours(hf, cfg, mesh)
    results[f"{spec}, expert_parallel"] = _forward(model, tokens, mesh)
    moe.set_impl(model, "dense_oracle")  # the oracle, partitioned by the compiler
    results[f"{spec}, dense_oracle"] = _forward(model, tokens, mesh)
  for name, got in results.items():
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(got, results["1 device, dense_oracle"], atol=2e-5, rtol=0,
                               err_msg=name)


def test_expert_parallel_really_splits_the_experts(hf_and_cfg):
  """The EP path compiles to an all-gather and a reduce-scatter, with 1 expert per device."""
  hf, cfg = hf_and_cfg
  mesh = _mesh("data:1,expert:8,tensor:1", cfg)
  model = oracle.ours(hf, cfg, mesh)
  experts = model.layers[1].ffn.experts.gate_proj[...]
  assert experts.sharding.shard_shape(experts.shape)[0] == 1
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(
        state, jnp.zeros((1, 16), jnp.int32)).compile().as_text()
  assert "all-gather" in hlo and "reduce-scatter" in hlo


def test_greedy_tokens_equal_on_every_mesh(hf_and_cfg):
  """A batch of three prompts of different lengths (crossing original_max 32)."""
  hf, cfg = hf_and_cfg
  outputs = {}
  for spec in MESHES:
    mesh = _mesh(spec, cfg)
    engine = Engine(oracle.ours(hf, cfg, mesh), max_len=64,
                    mesh=None if mesh.size == 1 else mesh)
    outputs[spec] = engine.generate(PROMPTS, max_new_tokens=24)
  assert all(len(o) == 24 for o in outputs[MESHES[0]])
  for prompt, got in zip(PROMPTS, outputs[MESHES[0]]):  # each mesh rounds in its own way
    forced = oracle.logits(hf, np.asarray([prompt + got]))[0, len(prompt) - 1:-1]
    oracle.assert_clear_winners(forced, got)
  for spec, got in outputs.items():
    assert got == outputs[MESHES[0]], spec


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _generate(flags, devices: int, **popen):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "generate.py"), *flags],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **popen)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["preset", "checkpoint"])
def test_two_processes_generate_what_one_does(tmp_path, source):
  """Two local processes x 4 CPU devices (gloo), one (data 2, expert 4) mesh: a random
  preset built in its shards, or a converted checkpoint each process restores its part of."""
  if source == "preset":
    model_flag = "--config=tiny"
  else:
    hf = oracle.hf_model(oracle.hf_config(num_hidden_layers=2, eos_token_id=None), seed=4)
    hf.save_pretrained(tmp_path / "hf")
    convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"), dtype="float32",
                        progress=False)
    model_flag = f"--ckpt={tmp_path / 'ckpt'}"
  prompt = [1, 2, 3, 40, 41]
  common = [model_flag, f"--prompt_ids={','.join(map(str, prompt))}", "--max_new_tokens=12"]
  # The one-process run goes alongside the pair: three starts overlapped, not two in turn.
  one = _generate([*common, "--mesh=data:1,expert:1,tensor:1",
                   f"--output_json={tmp_path / 'one.json'}"], devices=1)
  port = _free_port()
  procs = [_generate([*common, "--mesh=data:2,expert:4,tensor:1",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      f"--process_id={i}", f"--output_json={tmp_path / f'two{i}.json'}"],
                     devices=4) for i in range(2)]
  # communicate(), not wait(): full pipes would block a child.
  _, err = one.communicate(timeout=300)
  outs = [p.communicate(timeout=300) for p in procs]
  assert one.returncode == 0, err[-2000:]
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, (i, err[-3000:])
  assert "2 process(es)" in outs[0][1], outs[0][1][-2000:]
  assert not (tmp_path / "two1.json").exists()  # only process 0 writes
  want = json.loads((tmp_path / "one.json").read_text())["token_ids"]
  assert len(want) == 12
  if source == "preset":  # the weights --config=tiny draws with the default --seed=0
    model = Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0))
    forced = np.asarray(model(jnp.asarray([prompt + want])))[0]
  else:
    forced = oracle.logits(hf, np.asarray([prompt + want]))[0]
  oracle.assert_clear_winners(forced[len(prompt) - 1:-1], want)  # the meshes round differently
  streamed = " ".join(map(str, want))  # ...and prints (gloo's own chatter aside)
  assert streamed in outs[0][0] and streamed not in outs[1][0], outs[1][0][-2000:]
  assert json.loads((tmp_path / "two0.json").read_text())["token_ids"] == want


def test_119b_decode_step_lowers_on_an_8_device_mesh():
  """The release's decode step partitions over (1, 8, 1) from abstract inputs alone."""
  cfg = configs.resolve("small4_119b")
  mesh = _mesh("data:1,expert:8,tensor:1", cfg)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
  live = len(jax.live_arrays())
  paged = PagedModel(model, num_pages=8 * 4096 // 16, page_size=16, mesh=mesh)
  lowered = paged.lower_decode(batch=8, window=4096)
  assert len(jax.live_arrays()) == live  # nothing was allocated
  text = lowered.as_text()
  moe_layers = cfg.num_layers - cfg.first_k_dense_replace
  assert text.count("stablehlo.reduce_scatter") == moe_layers  # one EP combine per layer
  # Every stacked expert weight enters split over `expert` on its first axis.
  e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
  split = '{sdy.sharding = #sdy.sharding<@mesh, [{"expert"}, '
  signature = text[text.index("func.func public @main"):].split("\n", 1)[0]
  counts = [(signature.count(f"tensor<{shape}xbf16> {{"),
             signature.count(f"tensor<{shape}xbf16> {split}"))
            for shape in (f"{e}x{d}x{f}", f"{e}x{f}x{d}")]
  assert counts == [(2 * moe_layers, 2 * moe_layers), (moe_layers, moe_layers)]  # gate+up, down
