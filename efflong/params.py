"""Parameter creation shared by the attention families' modules and efflong.nn.

Every parameter carries logical axis names from its creation (batch, length, embed, heads,
head_dim, mlp, vocab); the config's sharding rules map them to mesh axes, and no module names a
mesh axis.

A leaf: it imports nothing of efflong, so that a family's module (efflong.attention) and the layers
around it (efflong.nn) both build on it without importing each other.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type


def partitioned(init: nnx.Initializer, *names: str | None) -> nnx.Initializer:
  """An initialiser that tags the parameter with logical axis names."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def head_projection(d_model: int, heads: int, head_dim: int, *, dtype: Dtype,
                    rngs: nnx.Rngs) -> nnx.Einsum:
  """x [B, T, D] -> [B, T, heads, head_dim], kernel tagged (embed, heads, head_dim)."""
  init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
  return nnx.Einsum('BTD,DNH->BTNH', (d_model, heads, head_dim), dtype=dtype, rngs=rngs,
                    kernel_init=partitioned(init, 'embed', 'heads', 'head_dim'))
