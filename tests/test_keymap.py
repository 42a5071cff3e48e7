"""The HF key map's error paths (the happy path is exercised by every parity test)."""

import numpy as np
import pytest
from flax import nnx

from smallfour.config import formats as config_formats
from smallfour.checkpoint import assemble, keymap
from smallfour.nn.decoder import Transformer
from tests import oracle


@pytest.fixture(scope="module")
def tiny():
  hf_cfg = oracle.hf_config(num_hidden_layers=2, first_k_dense_replace=1)
  cfg = config_formats.from_hf(hf_cfg.to_dict())
  return cfg, oracle.state_dict_numpy(oracle.hf_model(hf_cfg))


def test_wrong_shape_names_the_tensor(tiny):
  cfg, tensors = tiny
  bad = dict(tensors)
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  bad[name] = bad[name][:-1]
  with pytest.raises(assemble.CheckpointError,
                     match=rf"tensor {name} has shape \(95, 16\), expected \(96, 16\)"):
    oracle.ours(bad, cfg)


def test_unmapped_parameters_are_reported(tiny):
  cfg, tensors = tiny
  maps = [m for m in keymap.hf_layer_maps(cfg, 0)]
  with pytest.raises(assemble.CheckpointError, match=r"parameters have no checkpoint tensor"):
    assemble.load_into(Transformer(cfg, rngs=nnx.Rngs(0)), maps, assemble.DictSource(tensors))


def test_prefixes_name_the_same_tensors(tiny):
  cfg, _ = tiny
  names = {p: [s for g in keymap.hf_maps(cfg, p) for m in g for s in m.sources]
           for p in keymap.HF_TEXT_PREFIXES}
  assert "language_model.lm_head.weight" in names["language_model.model"]
  assert "lm_head.weight" in names["model.language_model"]
  assert len({len(v) for v in names.values()}) == 1
  assert all(np.all([s.startswith(("language_model.", "model.language_model.", "lm_head"))
                     for s in names[p]]) for p in ("language_model.model", "model.language_model"))
