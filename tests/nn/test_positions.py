"""Absolute positional encodings."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong.nn.positions import LearnedPositions, Positions, sinusoidal


def test_sinusoidal_shape_and_position_zero():
  enc = sinusoidal(jnp.arange(6)[None], 16)
  assert enc.shape == (1, 6, 16) and enc.dtype == jnp.float32
  np.testing.assert_array_equal(enc[0, 0, :8], 0.0)  # sin(0)
  np.testing.assert_array_equal(enc[0, 0, 8:], 1.0)  # cos(0)


def test_sinusoidal_values():
  """Frequencies run geometrically from 1 to 1 / max_timescale; sin half first, cos half second."""
  pos = np.array([[0, 1, 5, 100]])
  enc = np.asarray(sinusoidal(jnp.asarray(pos), 8, max_timescale=1e4))
  freq = 1e4 ** (-np.arange(4) / 3)  # 1, 1e-4/3 ... 1e-4
  want = np.concatenate([np.sin(pos[..., None] * freq), np.cos(pos[..., None] * freq)], -1)
  np.testing.assert_allclose(enc, want, atol=1e-5)
  np.testing.assert_allclose(enc[0, :, 0], np.sin(pos[0]), atol=1e-6)
  np.testing.assert_allclose(enc[0, :, 3], np.sin(pos[0] * 1e-4), atol=1e-6)
  assert np.all(np.abs(enc) <= 1.0)


def test_sinusoidal_depends_only_on_position_and_broadcasts_over_batch():
  pos = jnp.array([[0, 1, 2, 3], [3, 2, 1, 0]])
  enc = sinusoidal(pos, 6)
  assert enc.shape == (2, 4, 6)
  np.testing.assert_array_equal(enc[1], enc[0, ::-1])
  # Distinct positions get distinct encodings.
  flat = np.asarray(enc[0])
  assert len({tuple(row) for row in flat.round(6)}) == 4


@pytest.mark.parametrize('dim', [1, 7, 15])
def test_sinusoidal_odd_dim_is_zero_padded(dim):
  enc = sinusoidal(jnp.arange(5)[None], dim)
  half = dim // 2
  assert enc.shape == (1, 5, dim)
  np.testing.assert_array_equal(enc[..., -1], 0.0)  # The pad column.
  np.testing.assert_allclose(enc[..., :2 * half], sinusoidal(jnp.arange(5)[None], 2 * half), atol=0)


def test_positions_module_kinds():
  pos = jnp.arange(4)[None]
  sin = Positions('sinusoidal', 8, 6, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(sin(pos), sinusoidal(pos, 6))
  assert sin.learned is None
  assert Positions('none', 8, 6, rngs=nnx.Rngs(0))(pos) == 0.0
  learned = Positions('learned', 8, 6, rngs=nnx.Rngs(0))
  assert learned.learned.table.shape == (8, 6)
  np.testing.assert_array_equal(learned(pos)[0], learned.learned.table[...][:4])
  with pytest.raises(ValueError, match=r"unknown model.positions 'rope'; valid: \['sinusoidal'"):
    Positions('rope', 8, 6, rngs=nnx.Rngs(0))


def test_learned_positions_carry_axis_names():
  table = LearnedPositions(8, 6, rngs=nnx.Rngs(0)).table
  assert table.get_metadata()['out_sharding'] == ('length', 'embed')


def test_learned_positions_refuse_sequences_longer_than_the_table():
  table = LearnedPositions(4, 2, rngs=nnx.Rngs(0))
  assert table(jnp.arange(4)[None]).shape == (1, 4, 2)
  with pytest.raises(ValueError, match='sequence length 6 exceeds the learned position table'):
    table(jnp.arange(6)[None])
