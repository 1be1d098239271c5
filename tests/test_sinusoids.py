"""Sinusoidal position encodings: tensor2tensor's layout and the paper's."""

import jax.numpy as jnp
import numpy as np
import pytest

from efflong.sinusoids import sinusoidal, sinusoidal_paper


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


def test_sinusoidal_paper_values():
  """Vaswani et al. 2017, section 3.5: PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) = cos(...)."""
  pos = np.array([[0, 1, 5, 100]])
  for dim in (8, 7):
    enc = np.asarray(sinusoidal_paper(jnp.asarray(pos), dim))
    want = np.zeros(pos.shape + (dim,))
    for p in range(pos.shape[1]):
      for j in range(dim):
        angle = pos[0, p] / 1e4 ** (2 * (j // 2) / dim)
        want[0, p, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    assert enc.shape == pos.shape + (dim,) and enc.dtype == np.float32
    np.testing.assert_allclose(enc, want, atol=1e-5)


def test_layouts_differ_in_order_and_frequencies_only():
  """With the max_timescale that gives tensor2tensor's frequencies the paper's (10000^(-i/(D/2)),
  i.e. max_timescale 10000^((D/2 - 1)/(D/2))), its encoding is the paper's with the sines and
  cosines de-interleaved; with the default one it is not."""
  pos, dim = jnp.arange(50)[None], 8
  paper = np.asarray(sinusoidal_paper(pos, dim))
  deinterleaved = np.concatenate([paper[..., 0::2], paper[..., 1::2]], -1)
  matched = sinusoidal(pos, dim, max_timescale=1e4 ** (3 / 4))
  np.testing.assert_allclose(matched, deinterleaved, atol=1e-5)
  assert np.abs(np.asarray(sinusoidal(pos, dim)) - deinterleaved).max() > 0.1
