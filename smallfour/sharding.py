"""Mesh axes and THE logical-axis rule table.

Every parameter (and later every activation and cache array) is annotated with logical
axis names; this table alone decides which mesh axis each name is split over. MLA
weights are replicated by default (the latent cache has no head axis); routed experts
split their expert dimension over `expert`; `tensor` optionally splits heads and
MLP widths (spec: DESIGN.md, Sharding).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "expert", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations and the latent cache
    ("batch", ("data", "expert")),
    ("length", None),
    # the paged latent cache's pages and each page's rows (end to end): every device
    # holds the pool
    ("pages", None),
    ("page", None),
    ("layers", None),
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
    # vision encoder and projector: under 2% of the weights, replicated
    ("vision_patch", None),
    ("vision_embed", None),
    ("vision_heads", None),
    ("vision_head_dim", None),
    ("vision_mlp", None),
    ("vision_merge", None),
    ("projector_hidden", None),
    # LoRA adapters' rank (smallfour.train.lora): small, never split
    ("lora_rank", None),
)

LOGICAL_AXIS_NAMES: frozenset[str] = frozenset(name for name, _ in LOGICAL_AXIS_RULES)
_RULES: dict[str, Any] = dict(LOGICAL_AXIS_RULES)


def logical_spec(names: Sequence[str], shape: Sequence[int] | None = None,
                 mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> P:
  """The `PartitionSpec` the rule table gives an array with these logical axis names.

  With `shape` and `mesh`, a mesh axis that does not divide its dimension (what is left of
  it) is dropped, i.e. that part is replicated: a batch of 1 stays whole on a (data 2,
  expert 4) mesh instead of failing. Parameters never need this (the mesh builder checks
  their divisibility); activations and caches with small batches do.
  """
  entries = []
  for i, name in enumerate(names):
    if name not in _RULES:
      raise ValueError(f"logical axis {name!r} is not in sharding.LOGICAL_AXIS_RULES")
    axes = _RULES[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if shape is not None and mesh is not None:
      kept, size = [], shape[i]
      for axis in axes:
        if mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0:
          kept.append(axis)
          size //= mesh.shape[axis]
      axes = tuple(kept)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def logical_sharding(names: Sequence[str], shape: Sequence[int],
                     mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """`logical_spec` on `mesh`, as a `NamedSharding` for an array of `shape`."""
  return jax.sharding.NamedSharding(mesh, logical_spec(names, shape, mesh))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


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
              axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Auto
              ) -> jax.sharding.Mesh:
  """A (data, expert, tensor) mesh, validated against the devices and the model config.

  Axes are `Auto` by default: parameters, cache and inputs are placed explicitly by the
  rule table and the compiler propagates the rest; the MoE states its own layout with
  `shard_map`. (`Explicit` axes would need an `out_sharding` on every ambiguous op.)
  """
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


def init_sharded(make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh) -> nnx.Module:
  """Builds `make()` with every parameter created directly in its shard on `mesh`.

  The constructor runs under `jit` with the rule table's output shardings, so no device
  ever holds a whole model (random-weight presets of any size). Random values equal an
  unsharded construction (jax's partitionable threefry).
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  out = named_shardings(abstract_state, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=out)()
  return nnx.merge(graphdef, state)


def place(module: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Moves an existing module's parameters onto `mesh` by the rule table (in place)."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, named_shardings(state, mesh)))
  return module


def under_mesh(mesh: jax.sharding.Mesh | None, fn: Callable) -> Callable:
  """`fn`, called (and so traced) under `mesh` (`jax.set_mesh`: the MoE then runs
  expert-parallel); `fn` itself when there is no mesh."""
  if mesh is None:
    return fn

  def on_mesh(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return on_mesh
