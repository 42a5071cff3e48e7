"""Mesh axes and THE logical-axis rule table.

Every parameter (and later every activation and cache array) is annotated with logical
axis names; this table alone decides which mesh axis each name is split over. MLA
weights are replicated by default (the latent cache has no head axis); routed experts
split their expert dimension over `expert`; `tensor` optionally splits heads and
MLP widths (spec: DESIGN.md, Sharding).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

MESH_AXES: tuple[str, ...] = ("data", "expert", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "expert")),
    ("length", None),
    # embeddings and head
    ("vocab", "tensor"),
    ("embed", None),
    # MLA
    ("q_lora", None),
    ("kv_lora", None),
    ("kv_lora_rope", None),
    ("heads", "tensor"),
    ("qk_head_dim", None),
    ("qk_nope_head_dim", None),
    ("v_head_dim", None),
    # MoE and dense MLPs
    ("expert", "expert"),
    ("router_expert", None),
    ("expert_mlp", "tensor"),
    ("mlp", "tensor"),
    # norm scales
    ("norm", None),
)

LOGICAL_AXIS_NAMES: frozenset[str] = frozenset(name for name, _ in LOGICAL_AXIS_RULES)


def partition_specs(state: nnx.State) -> nnx.State:
  """Resolves each variable's logical `sharding` names to a mesh `PartitionSpec`."""
  with nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
    return nnx.get_partition_spec(state)


def named_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  """`NamedSharding`s on `mesh` for every variable of `state`."""
  return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec),
                      partition_specs(state))


class MeshError(ValueError):
  """A mesh that cannot hold this model on these devices."""


def parse_mesh(spec: str) -> dict[str, int]:
  """"data:2,expert:4,tensor:1" -> {"data": 2, "expert": 4, "tensor": 1}."""
  try:
    sizes = {k.strip(): int(v) for k, v in (part.split(":") for part in spec.split(","))}
  except ValueError:
    raise MeshError(f"--mesh={spec!r}: expected data:D,expert:E,tensor:T") from None
  if set(sizes) != set(MESH_AXES) or min(sizes.values()) < 1:
    raise MeshError(f"--mesh={spec!r}: expected positive sizes for each of {MESH_AXES}")
  return sizes


def make_mesh(sizes: dict[str, int], cfg=None, devices=None,
              axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Explicit
              ) -> jax.sharding.Mesh:
  """A (data, expert, tensor) mesh, validated against the devices and the model config."""
  devices = jax.devices() if devices is None else devices
  shape = tuple(sizes[a] for a in MESH_AXES)
  need = shape[0] * shape[1] * shape[2]
  if need > len(devices):
    raise MeshError(f"mesh {sizes} needs {need} devices; {len(devices)} are available")
  if cfg is not None:
    if cfg.num_experts % sizes["expert"]:
      raise MeshError(f"{cfg.num_experts} experts are not divisible by the expert axis "
                      f"({sizes['expert']})")
    if cfg.num_heads % sizes["tensor"]:
      raise MeshError(f"{cfg.num_heads} heads are not divisible by the tensor axis "
                      f"({sizes['tensor']})")
  return jax.make_mesh(shape, MESH_AXES, devices=devices[:need], axis_types=(axis_type,) * 3)
