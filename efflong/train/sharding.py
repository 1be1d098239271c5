"""Device mesh from the config, and logical-axis rules turned into NamedShardings.

Model code only names logical axes (batch, length, embed, heads, head_dim, mlp, vocab); this file is
the one place where they meet mesh axes (data, fsdp, model).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efflong import errors

MESH_AXES = ('data', 'fsdp', 'model')
Rules = Sequence[tuple[str, Any]]


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh; one size may be -1 (the remaining devices).

  With no -1 the mesh takes the first data * fsdp * model devices, so a 1-device mesh can run on an
  8-device host (the equality test does).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [cfg[a] for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise errors.Error(f'mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, at most one '
                       '-1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise errors.Error(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} '
                         'devices.')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise errors.Error(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; '
                       f'{len(devices)} available.')
  grid = np.asarray(devices[:math.prod(sizes)]).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_spec(names: Sequence[str | None], rules: Rules) -> P:
  """Logical axis names -> PartitionSpec by the rules table (an unlisted name is replicated)."""
  table = dict(rules)
  return P(*(table.get(n) if n is not None else None for n in names))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of nnx Variables (params, optimizer state) and plain arrays.

  Raises:
    ValueError: a parameter dimension that its mesh axes do not divide, naming the parameter.
  """
  with nnx.logical_axis_rules(list(rules)):
    specs = nnx.get_partition_spec(abstract_state)

  def check(path, leaf, spec):
    for dim, axes in zip(leaf.shape, spec):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      if dim % size:
        raise errors.Error(f'{jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be sharded '
                           f'as {spec} over mesh {dict(mesh.shape)}: {dim} is not divisible by '
                           f'{size}.')
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(check, abstract_state, specs)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Batch arrays [B, ...] are split over the mesh axes the rules give `batch`."""
  return NamedSharding(mesh, logical_spec(['batch'], rules))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
