"""Absolute positional encodings: sinusoidal (efflong.sinusoids, two layouts) and learned."""

from __future__ import annotations

import jax
from flax import nnx

from efflong import errors
from efflong.params import partitioned
from efflong.sinusoids import sinusoidal, sinusoidal_paper


class LearnedPositions(nnx.Module):
  """A learned [max_len, D] table."""

  def __init__(self, max_len: int, dim: int, *, rngs: nnx.Rngs):
    self.max_len = max_len
    init = partitioned(nnx.initializers.normal(0.02), 'max_len', 'embed')
    self.table = nnx.Param(init(rngs.params(), (max_len, dim)))

  def __call__(self, positions: jax.Array) -> jax.Array:
    """[B, T] positions -> [B, T, D]. Positions must be < max_len (the table's length)."""
    if positions.shape[-1] > self.max_len:
      raise errors.Error(f'sequence length {positions.shape[-1]} exceeds the learned position '
                         f'table ({self.max_len} = task.seq_len); use positions=sinusoidal or a '
                         'longer seq_len.')
    return self.table[...][positions]


class Positions(nnx.Module):
  """The configured absolute encoding: 'sinusoidal', 'sinusoidal_paper', 'learned' or 'none'.

  'sinusoidal' is tensor2tensor's layout (sines, then cosines), 'sinusoidal_paper' Vaswani et al.
  2017's (interleaved); efflong.sinusoids says how they differ.
  """

  SINUSOIDS = {'sinusoidal': sinusoidal, 'sinusoidal_paper': sinusoidal_paper}
  KINDS = (*SINUSOIDS, 'learned', 'none')

  def __init__(self, kind: str, max_len: int, dim: int, *, rngs: nnx.Rngs):
    if kind not in self.KINDS:
      raise errors.Error(f'unknown model.positions {kind!r}; valid: {list(self.KINDS)}.')
    self.kind, self.dim = kind, dim
    self.learned = LearnedPositions(max_len, dim, rngs=rngs) if kind == 'learned' else None

  def __call__(self, positions: jax.Array) -> jax.Array | float:
    """[B, T] positions -> [B, T, D] encodings to add (0.0 for 'none')."""
    if self.kind in self.SINUSOIDS:
      return self.SINUSOIDS[self.kind](positions, self.dim)
    if self.kind == 'learned':
      return self.learned(positions)
    return 0.0
