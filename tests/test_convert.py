"""Converter round trips (released layouts -> orbax -> restore -> transformers' logits) and its
fast paths: the orbax-layout writer, FP8 table lookup, blocked copies, block reads."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest
import tensorstore as ts
import torch
from flax import nnx
from safetensors.numpy import save_file

from smallfour import sharding, summary
from smallfour.chat import vocab as chat_vocab
from smallfour.config import formats as config_formats
from smallfour.checkpoint import convert as convert_lib
from smallfour.checkpoint import formats
from smallfour.checkpoint import restore as restore_lib
from smallfour.checkpoint import fp8, strided, tree
from smallfour.chat import ChatTokenizer
from smallfour.checkpoint.orbax_writer import TreeWriter
from smallfour.checkpoint.safetensors_source import SafetensorsSource
from tests import checkpoints, oracle

TOKENS = np.random.default_rng(5).integers(0, 256, (2, 48))  # crosses original_max=32


def hf_cfg(**kw):
  return oracle.hf_config(num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1,
                          n_shared_experts=2, routed_scaling_factor=1.3, **kw)


@pytest.fixture(scope="module")
def reference():
  cfg = hf_cfg()
  model = oracle.hf_model(cfg, seed=7)
  return cfg, model, oracle.state_dict_numpy(model)


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def logits_of(ckpt_dir, **kw):
  return np.asarray(forward(restore_lib.restore_model(ckpt_dir, **kw), jnp.asarray(TOKENS)))


def test_save_pretrained_round_trip(reference, tmp_path, caplog):
  cfg, model, _ = reference
  model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  with caplog.at_level(logging.INFO):
    stats = convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "out"), dtype="float32",
                                progress=False)
  assert "hf tensors, config from config.json; softmax_scale_mode=hf_mscale_fold" in caplog.text
  assert stats["written_bytes"] > 0
  meta = restore_lib.read_metadata(str(tmp_path / "out"))
  assert meta["text"]["softmax_scale_mode"] == "hf_mscale_fold"
  np.testing.assert_allclose(logits_of(str(tmp_path / "out")), oracle.logits(model, TOKENS),
                             atol=1e-4, rtol=0)


def test_native_fp8_round_trip(reference, tmp_path, caplog):
  cfg, _, tensors = reference
  dequantized = checkpoints.write_native_fp8(str(tmp_path / "native"), cfg, tensors)
  plain = oracle.hf_model(cfg, plain_softmax_scale=True)
  plain.load_state_dict({k: torch.as_tensor(v) for k, v in dequantized.items()})
  with caplog.at_level(logging.INFO):
    convert_lib.convert(str(tmp_path / "native"), str(tmp_path / "out"), dtype="float32",
                        progress=False)
  assert ("native tensors, config from params.json; softmax_scale_mode=plain: params.json "
          "yarn.apply_scale=false") in caplog.text
  out = tmp_path / "out"
  assert json.loads((out / "tekken.json").read_text())["config"]["pattern"] == "test"
  assert restore_lib.read_metadata(str(out))["text"]["softmax_scale_mode"] == "plain"
  np.testing.assert_allclose(logits_of(str(out)), oracle.logits(plain, TOKENS), atol=1e-4, rtol=0)
  # The flag overrides what the format implies.
  convert_lib.convert(str(tmp_path / "native"), str(tmp_path / "folded"), dtype="float32",
                      softmax_scale="hf_mscale_fold", progress=False)
  meta = restore_lib.read_metadata(str(tmp_path / "folded"))
  assert meta["text"]["softmax_scale_mode"] == "hf_mscale_fold"


def test_hub_layout_takes_the_scale_from_params_json(reference, tmp_path, caplog):
  """config.json + params.json (apply_scale false) + HF tensors: plain by default."""
  cfg, _, tensors = reference
  src = tmp_path / "hub"
  checkpoints.write_hf(str(src), cfg.to_dict(), tensors)
  (src / "params.json").write_text(json.dumps(checkpoints.native_params(cfg)))
  shutil.copyfile(chat_vocab.builtin_tekken_path(), src / "tekken.json")  # as the hub ships
  with caplog.at_level(logging.INFO):
    convert_lib.convert(str(src), str(tmp_path / "out"), dtype="float32", progress=False)
  # The tokenizer travels with the weights: `generate --ckpt` needs nothing else.
  assert (tmp_path / "out" / "tekken.json").read_bytes() == (src / "tekken.json").read_bytes()
  assert ChatTokenizer.from_file(str(tmp_path / "out" / "tekken.json")).encode(
      {"messages": [{"role": "user", "content": "hi"}]})
  assert (f"{src}: hf tensors, config from params.json, cross-checked with config.json; "
          "softmax_scale_mode=plain: params.json yarn.apply_scale=false") in caplog.text
  out = str(tmp_path / "out")
  assert restore_lib.read_metadata(out)["text"]["softmax_scale_mode"] == "plain"
  plain = oracle.hf_model(cfg, plain_softmax_scale=True)
  plain.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
  np.testing.assert_allclose(logits_of(out), oracle.logits(plain, TOKENS), atol=1e-4, rtol=0)
  with caplog.at_level(logging.INFO):
    convert_lib.convert(str(src), str(tmp_path / "folded"), dtype="float32",
                        softmax_scale="hf_mscale_fold", progress=False)
  assert "--softmax_scale=hf_mscale_fold overrides it" in caplog.text
  meta = restore_lib.read_metadata(str(tmp_path / "folded"))
  assert meta["text"]["softmax_scale_mode"] == "hf_mscale_fold"


def test_hub_layout_with_native_tensors(reference, tmp_path):
  """params.json decides whichever tensors are read."""
  cfg, _, tensors = reference
  src = tmp_path / "hub"
  checkpoints.write_native_fp8(str(src), cfg, tensors, with_tokenizer=False)
  (src / "config.json").write_text(json.dumps(cfg.to_dict()))
  ckpt = formats.open_checkpoint(str(src))
  ckpt.validate()
  assert (ckpt.kind, ckpt.config.softmax_scale_mode) == ("native", "plain")
  assert ckpt.config.pad_token_id == cfg.pad_token_id  # from config.json
  (src / "params.json").write_text(json.dumps(checkpoints.native_params(cfg, apply_scale=True)))
  assert formats.open_checkpoint(str(src)).config.softmax_scale_mode == "hf_mscale_fold"


def test_bfloat16_storage_and_sharded_restore(reference, tmp_path):
  cfg, model, _ = reference
  model.save_pretrained(tmp_path / "hf")
  convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
  out = str(tmp_path / "out")
  single = restore_lib.restore_model(out)
  assert single.layers[1].ffn.experts.gate_proj[...].dtype == jnp.bfloat16
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Explicit,) * 3)
  sharded = restore_lib.restore_model(out, mesh=mesh, dtype="float32")
  experts = sharded.layers[1].ffn.experts.gate_proj[...]
  assert experts.dtype == jnp.float32
  assert experts.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in experts.addressable_shards} == {1}  # 8 experts / 8 devices
  np.testing.assert_array_equal(np.asarray(experts),
                                np.asarray(single.layers[1].ffn.experts.gate_proj[...],
                                           np.float32))


def test_tree_writer_matches_orbax_save_pytree(tmp_path):
  """TreeWriter writes what orbax's own save writes, and orbax restores it."""
  rng = np.random.default_rng(0)
  flat = {("layers", 0, "attn", "w"): rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
          ("layers", 10, "x"): rng.standard_normal((3, 2, 5)).astype(np.float32),
          ("layers", 2, "x"): rng.standard_normal((7,)).astype(np.float32),
          ("embedder",): rng.standard_normal((6, 4)).astype(ml_dtypes.bfloat16)}
  done = []
  with TreeWriter(str(tmp_path / "ours"), max_pending_bytes=64) as writer:
    for path, array in flat.items():
      writer.write(path, array, on_done=done.append)
      writer.flush()
  assert len(done) == len(flat)
  ctx = ocp.Context()
  ctx.array.saving.use_compression = False
  with ctx:
    ocp.save(str(tmp_path / "orbax"), tree.nest(flat))

  def read_json(*parts):
    return json.loads((tmp_path.joinpath(*parts)).read_text())

  assert read_json("ours", "state", "_METADATA") == read_json("orbax", "state", "_METADATA")
  ours, theirs = read_json("ours", "_CHECKPOINT_METADATA"), read_json("orbax", "_CHECKPOINT_METADATA")
  assert {k: v for k, v in ours.items() if "timestamp" not in k} == {
      k: v for k, v in theirs.items() if "timestamp" not in k}
  for name in ("orbax.checkpoint", "commit_success.txt"):
    assert os.path.exists(tmp_path / "ours" / name)
  kv = {name: ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path / name}/state/"}
                              ).result() for name in ("ours", "orbax")}
  keys = kv["orbax"].list().result()
  assert kv["ours"].list().result() == keys
  for key in keys:
    if key.endswith(b"zarr.json"):
      assert kv["ours"].read(key).result().value == kv["orbax"].read(key).result().value
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        tree.nest(flat))
  loaded = ocp.load(str(tmp_path / "ours"), target)
  for path, array in flat.items():
    np.testing.assert_array_equal(np.asarray(tree.lookup(loaded, path)), array)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_fp8_table_lookup_is_the_arithmetic(dtype):
  codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
  e4m3 = codes.view(ml_dtypes.float8_e4m3fn)
  bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]
  for scale in (np.float32(1.0), np.float32(0.0123), np.float32(3e-5)):
    want = (e4m3.astype(np.float32) * scale).astype(dtype)
    got = fp8.dequantize_fp8(e4m3, np.array([scale]), dtype)
    np.testing.assert_array_equal(got.view(bits), want.view(bits))  # NaN codes included
    for rows in (16, 15):  # an even and an odd number of codes
      out = np.empty((16, rows), dtype)
      fp8.lookup_into(out, fp8.fp8_table(scale, dtype), codes[:rows].T)
      np.testing.assert_array_equal(out.view(bits), want[:rows].T.view(bits))


@pytest.mark.parametrize("dtype", [np.uint8, ml_dtypes.bfloat16, np.float32])
def test_blocked_copies_equal_numpy(dtype):
  w = np.random.default_rng(0).standard_normal((70, 45)).astype(dtype)
  for view in (w.T, w[3:50].T, w[:, 5:40].T, w[::2].T, w):
    np.testing.assert_array_equal(strided.contiguous(view), np.ascontiguousarray(view))
  np.testing.assert_array_equal(strided.transpose(w), w.T)


def test_reads_of_blocks(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((5, 6, 3)).astype(ml_dtypes.bfloat16),
             "b": rng.standard_normal((4,)).astype(np.float32)}
  save_file(tensors, str(tmp_path / "x.safetensors"))
  source = SafetensorsSource([str(tmp_path / "x.safetensors")], lambda n: n + "_scale")
  a = tensors["a"]
  for index, want in [(None, a), (2, a[2]), ((4, slice(1, 5)), a[4, 1:5]), ((0, slice(0, 6)), a[0])]:
    np.testing.assert_array_equal(source.read("a", index, a.dtype), want)
  np.testing.assert_array_equal(source.read("b", None, np.float32), tensors["b"])
  assert source.read_lookup("a", 1, np.float32) is None  # not FP8


@pytest.mark.parametrize("dense", [0, 1, 3])
def test_abstract_flat_equals_the_traced_model(dense):
  cfg = config_formats.from_hf(hf_cfg().to_dict()).replace(num_layers=4, first_k_dense_replace=dense)
  def described(flat):
    return {path: (var.shape, var.dtype, var.get_metadata()) for path, var in flat}

  want = described(nnx.to_flat_state(summary.traced_params(cfg, jnp.bfloat16)))
  assert described(summary.abstract_flat(cfg, jnp.bfloat16).items()) == want
  assert described(nnx.to_flat_state(summary.abstract_params(cfg, jnp.bfloat16))) == want
