"""Every parameter carries logical axes that the rule table resolves on a mesh."""

import jax
import numpy as np
import pytest
from flax import nnx

from smallfour import configs
from smallfour import sharding, summary
from smallfour.nn import params


@pytest.fixture(scope="module")
def abstract_119b():
  return summary.abstract_params(configs.resolve("small4_119b"))


def test_every_parameter_resolves_on_an_expert_mesh(abstract_119b):
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Explicit,) * 3)
  shardings = sharding.named_shardings(abstract_119b, mesh)
  flat_params = dict(nnx.to_flat_state(abstract_119b))
  flat_shardings = dict(nnx.to_flat_state(shardings))
  assert flat_params.keys() == flat_shardings.keys()
  for path, var in flat_params.items():
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == len(var.shape), path
    spec = flat_shardings[path].get_value().spec
    # Routed experts split their expert axis over `expert`; nothing else does.
    assert (spec[0] == "expert") == ("experts" in path), (path, spec)
  expert_down = flat_shardings[("layers", 0, "ffn", "experts", "down_proj")].get_value()
  assert expert_down.shard_shape((128, 2048, 4096)) == (16, 2048, 4096)


def test_unknown_axis_name_is_rejected():
  with pytest.raises(ValueError, match=r"logical axes \['hidden'\] are not in"):
    params.ones((4,), ("hidden",), np.float32)


@pytest.mark.parametrize("spec, message", [
    ("data:1,expert:16,tensor:1", "needs 16 devices; 8 are available"),
    ("data:1,expert:3,tensor:1", "128 experts are not divisible by the expert axis (3)"),
    ("data:1,expert:1,tensor:3", "32 heads are not divisible by the tensor axis (3)"),
    ("data:1,expert:2", "expected positive sizes for each of"),
    ("data=1", "expected data:D,expert:E,tensor:T"),
])
def test_impossible_meshes(spec, message):
  with pytest.raises(sharding.MeshError, match=message.replace("(", r"\(").replace(")", r"\)")):
    sharding.make_mesh(sharding.parse_mesh(spec), configs.resolve("small4_119b"))


def test_mesh_builder():
  mesh = sharding.make_mesh(sharding.parse_mesh("data:2,expert:4,tensor:1"),
                            configs.resolve("small4_119b"))
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "tensor": 1}
