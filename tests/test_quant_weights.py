"""Integer weights: the converter's `--dtype=int8|int4` from an FP8 release, restore (one
device and a mesh) and generation, against the float32 conversion of the same release
quantized in JAX by qwix (`nn/quant.py`), and every refusal."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
import tensorstore as ts
from flax import nnx

from smallfour import configs, sharding, summary
from smallfour.checkpoint import convert as convert_lib
from smallfour.checkpoint import quant as ckpt_quant
from smallfour.checkpoint import restore as restore_lib
from smallfour.checkpoint.layout import CheckpointError
from smallfour.inference.engine import Engine
from smallfour.nn import moe_kernels, quant
from tests import checkpoints, oracle
from tests.test_fp8_weights import write_hf_fp8

PROMPTS = [[1, 5, 7, 9, 11, 3], [3, 4]]
TOKENS = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 40)))
GROUP = 16  # divides hidden_size 64 and moe_intermediate_size 32
QUANTS = {"int8": quant.Quant("int8"), "int4": quant.Quant("int4", GROUP),
          "int4_dense_int8": quant.Quant("int4", GROUP, dense="int8")}


def hf_cfg():
  return oracle.hf_config(num_hidden_layers=3, first_k_dense_replace=1, n_group=2,
                          topk_group=1, n_shared_experts=2, routed_scaling_factor=1.3)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """One FP8 release (native layout) converted to float32 and to each integer layout."""
  root = tmp_path_factory.mktemp("quant")
  tensors = oracle.state_dict_numpy(oracle.hf_model(hf_cfg(), seed=7))
  checkpoints.write_native_fp8(str(root / "native"), hf_cfg(), tensors)
  stats = {"float32": convert_lib.convert(str(root / "native"), str(root / "float32"),
                                          dtype="float32", progress=False),
           "bfloat16": convert_lib.convert(str(root / "native"), str(root / "bfloat16"),
                                           dtype="bfloat16", progress=False)}
  for name, q in QUANTS.items():
    stats[name] = convert_lib.convert(str(root / "native"), str(root / name),
                                      dtype=q.experts, group_size=q.group_size,
                                      dense_dtype=q.dense, progress=False)
  return root, stats


def logits(model):
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS), np.float32)


# float32 from two programs (numpy, qwix op by op, ours under jit, integer kernels vs
# dequantized weights): equal to the last few bits, not bit for bit, since another CPU or
# XLA may fuse (and so round) otherwise. Integer codes are compared exactly.
TOL = dict(rtol=1e-5, atol=1e-5)


def assert_same(got, want, err_msg=""):
  """Integer codes bit for bit; floats (scales, weights) to float32 rounding."""
  got, want = np.asarray(got), np.asarray(want)
  if jnp.issubdtype(want.dtype, jnp.integer):
    np.testing.assert_array_equal(got, want, err_msg=err_msg)
  else:
    assert got.dtype == want.dtype, (got.dtype, want.dtype, err_msg)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-6,
                               atol=0, err_msg=err_msg)


def quantized_in_jax(root, q: quant.Quant):
  """The float32 conversion quantized by qwix in JAX, its other weights rounded to the
  bfloat16 an integer checkpoint stores them in."""
  model = quant.apply(restore_lib.restore_model(str(root / "float32")), q)
  nodes = list(nnx.iter_graph(model))
  held = {path for path, node in nodes if isinstance(node, quant.QuantWeight)}
  for path, node in nodes:
    if isinstance(node, nnx.Param) and path[:-1] not in held:
      node.set_value(node.get_value().astype(jnp.bfloat16).astype(jnp.float32))
  return model


@pytest.mark.parametrize("name", sorted(QUANTS))
def test_converted_equals_qwix_on_the_float32_weights(converted, name):
  """The converter quantizes the FP8 release's float32 values in numpy exactly as qwix
  does in JAX: the same codes, the same scales (to float32 rounding), so the same logits."""
  root, _ = converted
  q = QUANTS[name]
  restored = restore_lib.restore_model(str(root / name), dtype="float32")
  experts = restored.layers[1].ffn.experts
  assert isinstance(experts.down_proj, quant.QuantWeight)
  assert experts.down_proj.codes[...].dtype == quant.QTYPES[q.experts]
  int4 = q.experts == "int4"  # groups held as an axis: [E, F/g, g, D] codes
  assert experts.down_proj.codes[...].shape == ((8, 32 // GROUP, GROUP, 64) if int4
                                                else (8, 32, 64))
  assert experts.down_proj.scale[...].shape == ((8, 32 // GROUP, 1, 64) if int4
                                                else (8, 1, 64))
  attn = restored.layers[0].attn.q_a_proj
  assert isinstance(attn, quant.QuantWeight) == (q.dense == "int8")
  assert isinstance(restored.layers[1].ffn.router.kernel, nnx.Param)  # router stays
  assert isinstance(restored.lm_head, nnx.Param)
  reference = quantized_in_jax(root, q)
  for path, var in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
    got = nnx.state(restored, nnx.Param)
    for key in path:
      got = got[key]
    assert_same(got.get_value(), var.get_value(), err_msg=".".join(map(str, path)))
  np.testing.assert_allclose(logits(restored), logits(reference), **TOL)


def test_hf_fp8_release(tmp_path):
  """The HF layout (fused experts with per-expert scales, sliced per expert on the way):
  int4 codes are qwix's of the float32 conversion's weights."""
  tensors = oracle.state_dict_numpy(oracle.hf_model(hf_cfg(), seed=7))
  write_hf_fp8(str(tmp_path / "hf"), hf_cfg(), tensors)
  for dtype in ("float32", "int4"):
    convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / dtype), dtype=dtype,
                        group_size=GROUP, progress=False)
  want = quantized_in_jax(tmp_path, QUANTS["int4"])
  got = restore_lib.restore_model(str(tmp_path / "int4"), dtype="float32")
  flat = dict(nnx.to_flat_state(nnx.state(got, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(want, nnx.Param)):
    assert_same(flat[path].get_value(), var.get_value(), err_msg=str(path))


def test_int8_agrees_with_float32(converted):
  """Next-token choices of the int8 model are the float32 model's (a random model's
  logits sit close together; benchmarks/quant_accuracy.py measures a structured one)."""
  root, _ = converted
  want = logits(restore_lib.restore_model(str(root / "float32")))
  got = logits(restore_lib.restore_model(str(root / "int8"), dtype="float32"))
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("name", ["int8", "int4_dense_int8"])
def test_generation_on_a_mesh_equals_one_device(converted, name):
  """Codes and scales split over `expert` (widths and their groups over `tensor`); the
  expert-parallel MoE dequantizes inside the shard_map: the tokens of one device."""
  root, _ = converted
  mesh = sharding.make_mesh({"data": 1, "expert": 4, "tensor": 2})
  sharded = restore_lib.restore_model(str(root / name), mesh=mesh, dtype="float32")
  down = sharded.layers[1].ffn.experts.down_proj
  int4 = QUANTS[name].experts == "int4"  # whole groups of F on each `tensor` shard
  assert down.codes.get_value().sharding.spec == jax.sharding.PartitionSpec(
      "expert", "tensor", None, *([None] if int4 else []))
  assert down.scale.get_value().sharding.spec == jax.sharding.PartitionSpec(
      "expert", "tensor" if int4 else None, None, *([None] if int4 else []))
  single = restore_lib.restore_model(str(root / name), dtype="float32")
  want = Engine(single, max_len=64).generate(PROMPTS, 12)
  assert Engine(sharded, max_len=64, mesh=mesh).generate(PROMPTS, 12) == want


def _stored_bytes(params_dir) -> dict[str, int]:
  """{array: bytes of its stored chunk} (the OCDBT database also holds metadata and,
  for a model this small, b-tree nodes of comparable size)."""
  kv = ts.KvStore.open({"driver": "ocdbt",
                        "base": f"file://{os.path.abspath(params_dir)}/state/"}).result()
  return {key.decode().split("/")[0]: len(kv.read(key).result().value)
          for key in kv.list().result() if b"/c/" in key}


def _bits(flat) -> int:
  return sum(v.size * jnp.iinfo(v.dtype).bits if jnp.issubdtype(v.dtype, jnp.integer)
             else v.size * np.dtype(v.dtype).itemsize * 8 for v in flat.values())


def test_checkpoint_sizes(converted):
  """int4 codes are stored two to a byte: each array takes the bytes its dtype predicts
  (plus its 20-byte chunk index); for the released model int8 is ~0.51 and int4 ~0.28 of
  bfloat16."""
  root, _ = converted
  cfg = restore_lib.read_config(str(root / "float32"))
  for name, q in [("bfloat16", None), *QUANTS.items()]:
    flat = summary.abstract_flat(cfg, jnp.bfloat16, quant=q)
    stored = _stored_bytes(root / name / "params")
    for path, var in flat.items():
      key = ".".join(map(str, path))
      assert stored[key] == _bits({path: var}) // 8 + 20, (name, key)
  release = configs.resolve("small4_119b")
  bf16 = _bits(summary.abstract_flat(release, jnp.bfloat16))
  ratio = {name: _bits(summary.abstract_flat(release, jnp.bfloat16, quant=q)) / bf16
           for name, q in (("int8", quant.Quant("int8")), ("int4", quant.Quant("int4")))}
  assert 0.50 < ratio["int8"] < 0.52 and 0.27 < ratio["int4"] < 0.29, ratio


def test_refusals(converted, tmp_path):
  root, _ = converted
  with pytest.raises(CheckpointError,
                     match=r"--group_size=64 does not divide .*down_proj.s input dim 32"):
    convert_lib.convert(str(root / "native"), str(tmp_path / "g64"), dtype="int4",
                        group_size=64, progress=False)
  assert not (tmp_path / "g64").exists() and not (tmp_path / "g64.partial").exists()
  with pytest.raises(quant.QuantError, match="int4 is for the routed experts only"):
    quant.Quant("int4", dense="int4")
  with pytest.raises(quant.QuantError, match="router stays in the activation dtype"):
    quant.rule(quant.Quant("int4"), "router")
  with pytest.raises(CheckpointError, match="quantized with --group_size=16, not 32"):
    restore_lib.restore_model(str(root / "int4"), group_size=32)
  with pytest.raises(CheckpointError, match="stores int4 weights, so weights_dtype='int8'"):
    restore_lib.restore_model(str(root / "int4"), weights_dtype="int8")
  with pytest.raises(CheckpointError, match="stores bfloat16 weights, so weights_dtype='int4'"):
    restore_lib.restore_model(str(root / "bfloat16"), weights_dtype="int4")
  with pytest.raises(CheckpointError, match="as bfloat16, not int8"):
    restore_lib.restore_model(str(root / "int4"), dense_dtype="int8")
  with pytest.raises(CheckpointError, match="as int8, not bfloat16"):
    restore_lib.restore_model(str(root / "int4_dense_int8"), dense_dtype="bfloat16")


@pytest.mark.parametrize("qtype,group", [("int8", None), ("int4", 4)])
@pytest.mark.parametrize("kernel", sorted(moe_kernels.KERNELS))
def test_kernels_on_integer_experts_equal_them_on_dequantized_ones(kernel, qtype, group):
  rng = np.random.default_rng(0)
  e, d, f, n, k = 8, 16, 8, 5, 2
  stacked = [quant.quantize("w", jnp.asarray(rng.standard_normal(s), jnp.float32), (1,),
                            qtype, group) for s in ((e, d, f), (e, d, f), (e, f, d))]
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  weights = jnp.asarray(rng.random((n, k)), jnp.float32)
  ids = jnp.asarray(rng.integers(-1, e + 1, (n, k)), jnp.int32)  # foreign ids included
  run = jax.jit(moe_kernels.KERNELS[kernel])
  dequantized = [jnp.asarray(ckpt_dequantize(w)).reshape(w.shape) for w in stacked]
  np.testing.assert_allclose(run(*stacked, x, weights, ids), run(*dequantized, x, weights, ids),
                             **TOL)


def ckpt_dequantize(w) -> np.ndarray:
  """float32(code) · scale in numpy, in the held layout."""
  return np.asarray(w.codes).astype(np.float32) * np.asarray(w.scale)


def test_quantization_equals_qwix_eagerly_under_jit_and_in_numpy():
  """The same codes and scales from qwix.quantize (op by op), ours eagerly, inside a
  larger jit, on sharded values and the converter's numpy."""
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((4, 64, 32)) * rng.random((4, 1, 32))).astype(np.float32)
  w[1, :, 3] = 0  # an all-zero channel: scale 1, codes 0
  for qtype, group, dtype in (("int8", None, np.int8), ("int4", 16, ml_dtypes.int4)):
    q = quant.quantize("w", jnp.asarray(w), (1,), qtype, group)
    tiles = {1: group} if group else {}
    ref = qwix.quantize(jnp.asarray(w), quant.QTYPES[qtype],
                        channelwise_axes=[0, 2], tiled_axes=tiles)
    fused = jax.jit(lambda x: quant.quantize("w", x * 2.0, (1,), qtype, group))(
        jnp.asarray(w / 2.0))
    mesh = sharding.make_mesh({"data": 1, "expert": 4, "tensor": 2})
    split = jax.device_put(jnp.asarray(w), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("expert", None, "tensor")))
    sharded = jax.jit(lambda x: quant.quantize("w", x, (1,), qtype, group))(split)
    logical = lambda a: np.asarray(a.codes).reshape(w.shape)  # noqa: E731
    np.testing.assert_array_equal(logical(q), np.asarray(ref.qvalue))
    assert_same(np.asarray(q.scale).reshape(ref.scale.shape), ref.scale)
    for other in (fused, sharded):
      np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(other.codes))
      assert_same(q.scale, other.scale)
    codes, scale = ckpt_quant.quantize(w.reshape(q.codes.shape), q.scale.shape, dtype)
    np.testing.assert_array_equal(np.asarray(q.codes).astype(np.int8), codes.astype(np.int8))
    assert_same(q.scale, scale)


