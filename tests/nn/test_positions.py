"""Absolute positional encodings."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong.nn.positions import LearnedPositions, Positions
from efflong.sinusoids import sinusoidal, sinusoidal_paper


def test_positions_module_kinds():
  pos = jnp.arange(4)[None]
  sin = Positions('sinusoidal', 8, 6, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(sin(pos), sinusoidal(pos, 6))
  assert sin.learned is None
  paper = Positions('sinusoidal_paper', 8, 6, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(paper(pos), sinusoidal_paper(pos, 6))
  assert paper.learned is None
  assert Positions('none', 8, 6, rngs=nnx.Rngs(0))(pos) == 0.0
  learned = Positions('learned', 8, 6, rngs=nnx.Rngs(0))
  assert learned.learned.table.shape == (8, 6)
  np.testing.assert_array_equal(learned(pos)[0], learned.learned.table[...][:4])
  with pytest.raises(ValueError, match=r"unknown model.positions 'rope'; valid: \['sinusoidal'"):
    Positions('rope', 8, 6, rngs=nnx.Rngs(0))


def test_learned_positions_carry_axis_names():
  table = LearnedPositions(8, 6, rngs=nnx.Rngs(0)).table
  assert table.get_metadata()['out_sharding'] == ('max_len', 'embed')


def test_learned_positions_refuse_sequences_longer_than_the_table():
  table = LearnedPositions(4, 2, rngs=nnx.Rngs(0))
  assert table(jnp.arange(4)[None]).shape == (1, 4, 2)
  with pytest.raises(ValueError, match='sequence length 6 exceeds the learned position table'):
    table(jnp.arange(6)[None])
