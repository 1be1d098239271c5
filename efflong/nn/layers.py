"""Small layers with logical axis names on every parameter, and explicit-key dropout.

The names are attached by efflong.params, which the attention families' modules share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efflong.params import Dtype, partitioned


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout driven by an explicit key; the identity when key is None or rate is 0.

  An explicit key (rather than a stateful stream) lets a recomputation replay the same mask.
  """
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def layer_norm(dim: int, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, dtype=dtype, rngs=rngs,
                       scale_init=partitioned(nnx.initializers.ones, 'embed'),
                       bias_init=partitioned(nnx.initializers.zeros, 'embed'))


def dense(d_in: int, d_out: int, axes: tuple[str, str], *, dtype: Dtype,
          rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear layer whose kernel is tagged `axes` and bias the output axis."""
  return nnx.Linear(d_in, d_out, dtype=dtype, rngs=rngs,
                    kernel_init=partitioned(nnx.initializers.lecun_normal(), *axes),
                    bias_init=partitioned(nnx.initializers.zeros, axes[1]))

