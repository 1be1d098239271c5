"""Parameter creation shared by the attention families' modules and efflong.nn.

Every parameter carries logical axis names from its creation (batch, length, embed, heads,
head_dim, mlp, vocab); the config's sharding rules map them to mesh axes, and no module names a
mesh axis.

Which parameters are kernels (`is_kernel`, `kernel_mask`: the weight matrices contracted with
activations) is read from the same names: weight decay, pruning and quantization reach only them.

A leaf: it imports nothing of efflong but its error type, so that a family's module
(efflong.attention) and the layers around it (efflong.nn) both build on it without importing each
other.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efflong import errors

Dtype = jnp.dtype | type


def path_keys(path: tuple) -> tuple:
  """A jax tree path as plain keys (str and int): ('stack', 'layers', 0, 'ff', 'wi', 'kernel')."""
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)


def partitioned(init: nnx.Initializer, *names: str | None) -> nnx.Initializer:
  """An initialiser that tags the parameter with logical axis names."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def head_projection(d_model: int, heads: int, head_dim: int, *, dtype: Dtype,
                    rngs: nnx.Rngs) -> nnx.Einsum:
  """x [B, T, D] -> [B, T, heads, head_dim], kernel tagged (embed, heads, head_dim)."""
  init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
  return nnx.Einsum('BTD,DNH->BTNH', (d_model, heads, head_dim), dtype=dtype, rngs=rngs,
                    kernel_init=partitioned(init, 'embed', 'heads', 'head_dim'))


# The leading axes by which a kernel is contracted with an activation's features; a parameter that
# starts with one of them and has further (output) axes is a kernel.
_KERNEL_INPUTS = (('embed',), ('mlp',), ('heads', 'head_dim'))


def kernel_inputs(names: Sequence[str | None]) -> int:
  """How many leading axes of a kernel with these logical axis names are its input (contracted)
  axes: 1 for ('embed', ...) and ('mlp', ...), 2 for ('heads', 'head_dim', ...); 0 if the
  parameter is not a kernel (`is_kernel`)."""
  names = tuple(names)
  return next((len(inputs) for inputs in _KERNEL_INPUTS
               if names[:len(inputs)] == inputs and len(names) > len(inputs)), 0)


def is_kernel(names: Sequence[str | None]) -> bool:
  """Whether a parameter with these logical axis names is a projection's or feed-forward's kernel.

  A kernel's leading axes are contracted with an activation's features ('embed', 'mlp', or the
  head space 'heads', 'head_dim') and at least one output axis follows: the q, k, v, o projections,
  Longformer's global and Transformer-XL's position projection W_R (embed, heads, head_dim), the
  feed-forward (embed, mlp), (mlp, embed), the untied output head (embed, vocab) and a classifier's
  (embed, None). Not kernels: the token embedding (vocab, embed) and position tables
  (length, embed), whose rows are looked up; Linformer's length projections E, F
  (None, None, length), indexed by position like a position table; norms and biases (one axis);
  Transformer-XL's u and v (heads, head_dim), biases added to the queries.
  """
  return kernel_inputs(names) > 0


def kernel_mask(params: Any) -> Any:
  """True for the kernels (`is_kernel`), False for every other parameter, by logical axis names.

  Args:
    params: a tree of nnx Variables carrying logical axis names (`partitioned`), such
      as the trainer's parameters, gradients and updates (their Variables keep the names).
  Returns:
    The tree with a bool in place of each Variable.
  Raises:
    errors.Error: a parameter without logical axis names, named by its path.
  """
  def decays(path, leaf) -> bool:
    names = leaf.get_metadata('out_sharding', None) if isinstance(leaf, nnx.Variable) else None
    if names is None:
      raise errors.Error(f'parameter {jax.tree_util.keystr(path)} has no logical axis names; '
                         'weight decay, pruning and sharding read them: create it with '
                         'efflong.params.partitioned.')
    return is_kernel(names)

  return jax.tree_util.tree_map_with_path(decays, params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))
