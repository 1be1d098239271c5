"""Absolute positional encodings: sinusoidal (Vaswani et al. 2017, section 3.5) and learned."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efflong.nn.layers import partitioned


def sinusoidal(positions: jax.Array, dim: int, max_timescale: float = 1e4) -> jax.Array:
  """[B, T] integer positions -> [B, T, D] encodings: sin on the first half, cos on the second."""
  half = dim // 2
  inv_freq = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, dim - 2 * half)])


class LearnedPositions(nnx.Module):
  """A learned [max_len, D] table."""

  def __init__(self, max_len: int, dim: int, *, rngs: nnx.Rngs):
    self.max_len = max_len
    init = partitioned(nnx.initializers.normal(0.02), 'length', 'embed')
    self.table = nnx.Param(init(rngs.params(), (max_len, dim)))

  def __call__(self, positions: jax.Array) -> jax.Array:
    """[B, T] positions -> [B, T, D]. Positions must be < max_len (the table's length)."""
    if positions.shape[-1] > self.max_len:
      raise ValueError(f'sequence length {positions.shape[-1]} exceeds the learned position table '
                       f'({self.max_len} = task.seq_len); use positions=sinusoidal or a longer seq_len.')
    return self.table[...][positions]


class Positions(nnx.Module):
  """The configured absolute encoding: 'sinusoidal', 'learned' or 'none'."""

  KINDS = ('sinusoidal', 'learned', 'none')

  def __init__(self, kind: str, max_len: int, dim: int, *, rngs: nnx.Rngs):
    if kind not in self.KINDS:
      raise ValueError(f'unknown model.positions {kind!r}; valid: {list(self.KINDS)}.')
    self.kind, self.dim = kind, dim
    self.learned = LearnedPositions(max_len, dim, rngs=rngs) if kind == 'learned' else None

  def __call__(self, positions: jax.Array) -> jax.Array | float:
    """[B, T] positions -> [B, T, D] encodings to add (0.0 for 'none')."""
    if self.kind == 'sinusoidal':
      return sinusoidal(positions, self.dim)
    if self.kind == 'learned':
      return self.learned(positions)
    return 0.0
