"""FP8-resident weights: the converter's `--dtype=fp8`, restore with `weights_dtype="fp8"`,
and generation, checked against the dequantized path (the same FP8 release converted to
float32 / bfloat16)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from smallfour import configs, sharding, summary
from smallfour.checkpoint import convert as convert_lib
from smallfour.checkpoint import restore as restore_lib
from smallfour.checkpoint.layout import CheckpointError
from smallfour.inference.engine import Engine
from smallfour.nn import fp8, moe, moe_kernels
from tests import checkpoints, oracle

PROMPTS = [[1, 5, 7, 9, 11, 3], [3, 4]]
TOKENS = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 40)))


def hf_cfg():
  return oracle.hf_config(num_hidden_layers=3, first_k_dense_replace=1, n_group=2,
                          topk_group=1, n_shared_experts=2, routed_scaling_factor=1.3)


def write_hf_fp8(directory: str, cfg, tensors: dict[str, np.ndarray]) -> None:
  """The HF layout of the FP8 release: per-tensor `weight_scale_inv` for the linears,
  `[E, 1, 1]` per-expert scales for the fused experts, bf16 embedding/head/norms/router."""
  out = {}
  for name, w in tensors.items():
    keep = name.endswith(("embed_tokens.weight", "norm.weight", "layernorm.weight",
                          "mlp.gate.weight")) or name == "lm_head.weight"
    if keep:
      out[name] = w.astype(ml_dtypes.bfloat16)
      continue
    per_expert = w.ndim == 3
    amax = np.abs(w).max(axis=(1, 2), keepdims=True) if per_expert else np.abs(w).max()
    scale = np.asarray(amax / checkpoints.F8_MAX, np.float32)
    out[name] = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    out[name + "_scale_inv"] = scale
    act = name[:-len(".weight")] + ".activation_scale" if name.endswith(".weight") else (
        name + "_activation_scale")
    out[act] = np.ones(w.shape[0] if per_expert else (), np.float32)
  checkpoints.write_hf(directory, cfg.to_dict(), out)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """One FP8 release (native layout) converted three ways, and its HF twin as fp8."""
  cfg = hf_cfg()
  tensors = oracle.state_dict_numpy(oracle.hf_model(cfg, seed=7))
  root = tmp_path_factory.mktemp("fp8")
  checkpoints.write_native_fp8(str(root / "native"), cfg, tensors)
  stats = {dtype: convert_lib.convert(str(root / "native"), str(root / dtype), dtype=dtype,
                                      progress=False)
           for dtype in ("float32", "bfloat16", "fp8")}
  write_hf_fp8(str(root / "hf"), cfg, tensors)
  for dtype in ("float32", "fp8"):
    convert_lib.convert(str(root / "hf"), str(root / f"hf_{dtype}"), dtype=dtype,
                        progress=False)
  return root, stats


def logits(model):
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS), np.float32)


# Two compiled programs (codes dequantized inside the matmul vs stored floats) may round
# differently where the compiler fuses otherwise (another CPU, another XLA): equal to
# float32's last few bits, to bfloat16's last bit or two.
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_resident_equals_the_dequantized_path(converted, dtype):
  """The e4m3 codes dequantized inside each matmul are the values the converter stores,
  so logits are equal (to rounding), and generation is equal token for token."""
  root, _ = converted
  resident = restore_lib.restore_model(str(root / "fp8"), dtype=dtype)
  plain = restore_lib.restore_model(str(root / dtype))
  attn = resident.layers[0].attn
  assert isinstance(attn.q_a_proj, fp8.Fp8Weight)
  assert attn.q_a_proj.codes.get_value().dtype == jnp.float8_e4m3fn
  assert resident.layers[1].ffn.experts.gate_proj.scale.get_value().shape == (8,)  # per expert
  assert resident.lm_head.get_value().dtype == resident.embedder.get_value().dtype == dtype
  np.testing.assert_allclose(logits(resident), logits(plain), **TOL[dtype])
  if dtype == "float32":  # equal logits make equal tokens; generation is checked once
    want = Engine(plain, max_len=64).generate(PROMPTS, 12)
    assert Engine(resident, max_len=64).generate(PROMPTS, 12) == want


def test_fp8_resident_expert_parallel(converted):
  """Codes and per-expert scales split over `expert` (and widths over `tensor`); the
  expert-parallel MoE dequantizes inside the shard_map, so tokens equal one device's."""
  root, _ = converted
  mesh = sharding.make_mesh({"data": 1, "expert": 4, "tensor": 2})
  resident = restore_lib.restore_model(str(root / "fp8"), mesh=mesh, dtype="float32")
  experts = resident.layers[1].ffn.experts.gate_proj
  assert experts.scale.get_value().sharding.spec == jax.sharding.PartitionSpec("expert")
  assert experts.codes.get_value().sharding.spec == jax.sharding.PartitionSpec(
      "expert", None, "tensor")
  want = Engine(restore_lib.restore_model(str(root / "float32")), max_len=64).generate(
      PROMPTS, 12)
  assert Engine(resident, max_len=64, mesh=mesh).generate(PROMPTS, 12) == want


def test_hf_fp8_release(converted):
  """The HF layout: fused experts sliced per expert with their [E, 1, 1] scales (gate and
  up share one), per-tensor `weight_scale_inv`, and the dequantized path's logits."""
  root, _ = converted
  resident = restore_lib.restore_model(str(root / "hf_fp8"), dtype="float32")
  experts = resident.layers[1].ffn.experts
  np.testing.assert_array_equal(experts.gate_proj.scale[...], experts.up_proj.scale[...])
  np.testing.assert_allclose(
      logits(resident), logits(restore_lib.restore_model(str(root / "hf_float32"))),
      **TOL["float32"])


def test_fp8_checkpoint_is_about_half_the_bfloat16_one(converted):
  _, stats = converted
  # The tiny model's bf16 embedding and head are a third of it; the release's are 2%.
  assert stats["fp8"]["written_bytes"] / stats["bfloat16"]["written_bytes"] < 0.6
  release = configs.resolve("small4_119b")
  def nbytes(flat):
    return sum(v.size * np.dtype(v.dtype).itemsize for v in flat.values())
  ratio = (nbytes(summary.abstract_flat(release, jnp.bfloat16, fp8=True))
           / nbytes(summary.abstract_flat(release, jnp.bfloat16)))
  assert 0.5 < ratio < 0.52, ratio


def test_refusals(converted, tmp_path):
  root, _ = converted
  with pytest.raises(CheckpointError, match="stores bfloat16 weights"):
    restore_lib.restore_model(str(root / "bfloat16"), weights_dtype="fp8")
  with pytest.raises(CheckpointError, match="stores fp8 weights"):
    restore_lib.restore_model(str(root / "fp8"), weights_dtype="bfloat16")
  bf16_release = tmp_path / "bf16_release"
  tensors = oracle.state_dict_numpy(oracle.hf_model(hf_cfg(), seed=7))
  checkpoints.write_hf(str(bf16_release), hf_cfg().to_dict(),
                       {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()})
  with pytest.raises(CheckpointError, match=r"--dtype=fp8 keeps .* is BF16"):
    convert_lib.convert(str(bf16_release), str(tmp_path / "out"), dtype="fp8", progress=False)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kernel", sorted(moe_kernels.KERNELS))
def test_kernels_on_fp8_experts_equal_them_on_dequantized_ones(kernel):
  rng = np.random.default_rng(0)
  e, d, f, n, k = 8, 16, 8, 5, 2
  stacked = [fp8.quantize(jnp.asarray(rng.standard_normal(s), jnp.float32), 1)
             for s in ((e, d, f), (e, d, f), (e, f, d))]
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  weights = jnp.asarray(rng.random((n, k)), jnp.float32)
  ids = jnp.asarray(rng.integers(-1, e + 1, (n, k)), jnp.int32)  # foreign ids included
  run = jax.jit(moe_kernels.KERNELS[kernel])
  want = run(*[w.dequantize(jnp.float32) for w in stacked], x, weights, ids)
  np.testing.assert_allclose(run(*stacked, x, weights, ids), want, **TOL["float32"])


def test_random_fp8_weights():
  """A preset built FP8-resident is absmax-quantized at init: positive per-expert scales,
  codes that reproduce the weights to e4m3 precision."""
  cfg = configs.resolve("tiny")
  make = lambda fp8_weights: moe.RoutedExperts(  # noqa: E731
      cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, fp8=fp8_weights)
  w, q = make(False).up_proj[...], make(True).up_proj
  assert q.codes[...].dtype == jnp.float8_e4m3fn
  assert q.scale[...].shape == (cfg.num_experts,) and bool(jnp.all(q.scale[...] > 0))
  np.testing.assert_allclose(q[...], w, rtol=2**-3, atol=1e-6)  # e4m3: 3 mantissa bits
