"""Device mesh from the config, and logical-axis rules turned into NamedShardings.

Model code only names logical axes (batch, length, embed, heads, head_dim, mlp, vocab); this file is
the one place where they meet mesh axes (data, fsdp, context, model). The train and eval steps are
traced under the mesh and the rules (`traced_under`), so that model code can ask which mesh axes the
rules give a logical axis: the attention layer splits the length over `context` that way.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efflong import errors

MESH_AXES = ('data', 'fsdp', 'context', 'model')
Rules = Sequence[tuple[str, Any]]


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, context, model) mesh; one size may be -1 (the remaining devices).

  With no -1 the mesh takes the first data * fsdp * context * model devices, so a 1-device mesh can
  run on an 8-device host (the equality test does). The context devices of one data row are
  adjacent, so the ring of context parallelism runs between neighbouring devices.
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


def axes_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
  """The number of devices along a PartitionSpec entry (one mesh axis, several, or None)."""
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


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
      size = axes_size(mesh, axes)
      if dim % size:
        raise errors.Error(f'{jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be sharded '
                           f'as {spec} over mesh {dict(mesh.shape)}: {dim} is not divisible by '
                           f'{size}.')
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(check, abstract_state, specs)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Batch arrays [B, T, ...] are split over the mesh axes the rules give `batch` and `length`;
  `array_sharding` keeps only the batch part for an array without a length axis."""
  return NamedSharding(mesh, logical_spec(['batch', 'length'], rules))


def array_sharding(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """The batch sharding of one array of the batch: [B] and [B, L] with an L that the length's mesh
  axes do not divide (e.g. a classifier's label slots) are split over the batch only."""
  spec = sharding.spec
  axes = spec[1] if len(spec) > 1 else None
  if len(shape) < 2 or shape[1] % axes_size(sharding.mesh, axes):
    spec = P(*spec[:1])
  return NamedSharding(sharding.mesh, spec)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded over the batch axis (and over
  the length axis, see array_sharding; each process holds whole rows)."""
  return {k: jax.make_array_from_process_local_data(array_sharding(sharding, np.shape(v)), v)
          for k, v in local.items()}


def traced_under(mesh: Mesh, rules: Rules, fn: Callable[..., Any]) -> Callable[..., Any]:
  """fn, traced with mesh as JAX's abstract mesh and rules as flax's logical axis rules: model code
  reads them (jax.sharding.get_abstract_mesh, flax.linen.logical_to_mesh_axes) to place a
  shard_map, e.g. the attention layer's context-parallel twin."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(list(rules)):
      return fn(*args, **kwargs)

  return traced
