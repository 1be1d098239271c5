"""Pallas kernels for the hot paths; each has its XLA twin in efflong.attention.

flash_attention      block-sparse softmax attention (dense, every fixed sparse pattern, LSH after
                     its sort); twin: efflong.attention.blocksparse.attend_layout
linear_attention     chunked causal linear attention; twin: efflong.attention.linear._prefix

`config.model.attention_impl` chooses between them: 'xla', 'pallas', or 'auto' (Pallas where the
kernels are meant to be lowered, the GPU; XLA elsewhere). On the CPU a 'pallas' kernel runs in
Pallas' interpreter (how the tests run it): correct, but slow. On TPU 'pallas' is refused: the
kernels read the layout as scalars from ordinary refs and slide over whole-sequence refs, which
Mosaic would want as scalar prefetch and a key-tile grid axis.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as pltriton
from jax.sharding import NamedSharding, PartitionSpec

from efflong import errors

IMPLS = ('xla', 'pallas', 'auto')


def check(impl: str) -> None:
  """Raises ValueError on an impl that is not one of IMPLS."""
  if impl not in IMPLS:
    raise errors.Error(f'impl={impl!r} (config.model.attention_impl); valid: {list(IMPLS)}.')


def resolve(impl: str, tile: int | None = None) -> str:
  """'xla' or 'pallas': 'auto' is Pallas on the GPU (the kernels are written for its Triton
  lowering), where the kernel's tile (if it is given by the caller) is a power of two >= 16, and
  XLA on every other backend or tile. On the GPU, 'auto' falling back to XLA for a tile is logged
  (a warning, once per tile)."""
  check(impl)
  backend = jax.default_backend()
  if impl == 'auto':
    if backend != 'gpu':
      return 'xla'
    if tile is not None and tile != pow2(tile, 16):
      _warn_once(f"attention_impl='auto' runs XLA, not the Pallas kernels, for tile {tile}: "
                 "Triton needs a power of two >= 16; set the family's block (LSH: bucket_size) "
                 'to one to use the kernels.')
      return 'xla'
    return 'pallas'
  if impl == 'pallas' and backend == 'tpu':
    raise errors.Error("attention_impl='pallas' is not available on TPU: the kernels are written "
                       "for the GPU's Triton lowering (and interpreted on the CPU); use 'xla' or "
                       "'auto'.")
  return impl


@functools.cache
def _warn_once(message: str) -> None:
  """Logs a warning the first time a message is given (functools.cache remembers the others)."""
  logging.warning(message)


def triton(num_warps: int = 4) -> pltriton.CompilerParams:
  """Compiler parameters that select Pallas' Triton lowering on the GPU (JAX's default there is
  Mosaic GPU, for which these kernels are not written)."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def pow2(n: int, least: int) -> int:
  """The smallest power of two >= max(n, least): Triton loads and stores power-of-two shapes."""
  return max(least, 1 << (n - 1).bit_length())


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """a @ b contracting axis contract[0] of a with contract[1] of b, accumulated in float32.

  float32 operands are multiplied in full float32 (Triton would otherwise use TF32).
  """
  precision = jax.lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else None
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)


def interpret() -> bool:
  """Whether pallas_call must interpret the kernels: everywhere but the GPU."""
  return jax.default_backend() != 'gpu'


def partition() -> bool:
  """Whether kernel calls go through `batch_sharded`: when compiled (the GPU) on several devices.
  An interpreted kernel is ordinary HLO, which XLA's partitioner splits by itself."""
  return not interpret() and jax.device_count() > 1


def batch_sharded(fn: Callable[..., Any], args: Sequence[jax.Array],
                  batched: Sequence[bool]) -> Any:
  """fn(*args), each device running fn on its own batch rows (when `partition()`).

  XLA's SPMD partitioner cannot see into a kernel's custom call and would give every device the
  whole batch. Here the batch (leading) dimension keeps the sharding of the first batched
  argument; the other dimensions of every argument, and the unbatched arguments, are replicated.

  Args:
    fn: the kernel call; every output has a leading batch dimension.
    args: its arrays.
    batched: per argument, whether its leading dimension is the batch.
  Returns:
    fn(*args), its outputs sharded over the batch like the first batched argument.
  """
  if not partition():
    return fn(*args)
  first = list(batched).index(True)

  def batch_axes(arg_shapes) -> Any:
    spec = arg_shapes[first].sharding.spec
    return spec[0] if len(spec) else None

  def sharding(mesh, ndim: int, axes: Any) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))

  def infer(mesh, arg_shapes, result_shape):
    axes = batch_axes(arg_shapes)
    return jax.tree.map(lambda r: sharding(mesh, len(r.shape), axes), result_shape)

  def split(mesh, arg_shapes, result_shape):
    axes = batch_axes(arg_shapes)
    arg_shardings = tuple(sharding(mesh, len(a.shape), axes if b else None)
                          for a, b in zip(arg_shapes, batched))
    return mesh, fn, infer(mesh, arg_shapes, result_shape), arg_shardings

  # Shardy's rule: the factor b is every batched leading dimension; all others are their own
  # factors and stay replicated.
  names = (f'f{i}' for i in itertools.count())
  others: list[str] = []

  def factors(ndim: int, has_batch: bool) -> str:
    own = [next(names) for _ in range(ndim - has_batch)]
    others.extend(own)
    return ' '.join(['b'] * has_batch + own)

  results = jax.tree.leaves(jax.eval_shape(fn, *args))
  rule = (', '.join(factors(a.ndim, b) for a, b in zip(args, batched)) + ' -> '
          + ', '.join(factors(r.ndim, True) for r in results))
  call = custom_partitioning(lambda *a: fn(*a))  # positional only, whatever fn's signature
  call.def_partition(partition=split, infer_sharding_from_operands=infer, sharding_rule=rule,
                     need_replication_factors=tuple(others))
  return call(*args)
