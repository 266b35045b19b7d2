"""Device mesh and MaxText-style logical-axis rules.

Parameters are annotated with logical axis names (see `debertax.layers`); `LOGICAL_RULES` maps them onto
the mesh axes (data, fsdp, tensor). Activations use the `act_*` names so that the batch can take the
fsdp axis while the same tensor's hidden dimension stays whole.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_in", "fsdp"),
    ("embed_out", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("rel", None),
    ("positions", None),
    ("token_types", None),
    ("labels", None),
    ("conv_window", None),
    ("embed_group", None),
)


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """{data, fsdp, tensor} with at most one -1 ('the rest') -> concrete sizes that multiply to num_devices."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                       f"divide the {num_devices} available devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # Topology-aware placement is only available on some platforms; order is fine elsewhere.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned (unboxed leaves: replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, ...] arrays split over data x fsdp."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe_param_sharding(boxed_tree) -> dict[str, str]:
  """Logical axis -> mesh axis for the tree's parameter dimensions (for logs and the plan table)."""
  used = set()
  for spec in jax.tree_util.tree_leaves(nn.get_partition_spec(boxed_tree),
                                        is_leaf=lambda x: isinstance(x, PartitionSpec)):
    used.update(a for a in spec if a)
  rules = dict(LOGICAL_RULES)
  return {axis: str(rules.get(axis)) for axis in sorted(used)}


class MeshRules:
  """Mesh + logical-axis rules in scope, so the model's activation constraints resolve.

      with MeshRules(mesh):
        out = jitted_step(state, batch)
  """

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self._stack = []

  def __enter__(self):
    self._stack = [nn.logical_axis_rules(LOGICAL_RULES), jax.set_mesh(self.mesh)]
    for ctx in self._stack:
      ctx.__enter__()
    return self

  def __exit__(self, *exc):
    for ctx in reversed(self._stack):
      ctx.__exit__(*exc)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
  """Optimizer leaves that mirror a parameter (Adam's mu/nu) take its sharding; the rest is replicated.

  Matching is by the dict-key path that ends the leaf's tree path, plus the shape.
  """
  from flax import traverse_util
  flat_params = traverse_util.flatten_dict(nn.unbox(abstract_params))
  flat_shardings = traverse_util.flatten_dict(param_shardings)
  replicated_sharding = replicated(mesh)

  def pick(path, leaf):
    keys = tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))
    for start in range(len(keys)):
      candidate = keys[start:]
      if candidate in flat_params and flat_params[candidate].shape == leaf.shape:
        return flat_shardings[candidate]
    return replicated_sharding

  return jax.tree_util.tree_map_with_path(pick, nn.unbox(abstract_opt_state))


def global_batch(local_batch: dict, sharding: NamedSharding, keys=None) -> dict:
  """This host's rows -> global arrays with `sharding` (each host passes only its rows; the global
  leading dimension is the local one times the number of processes). `keys`: which entries (default all)."""
  out = {}
  for key in (local_batch if keys is None else keys):
    value = local_batch[key]
    if isinstance(value, jax.Array) and value.sharding == sharding:
      out[key] = value
      continue
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
