"""Helpers shared by the attention tests: random inputs, a jitted vjp, a relative comparison, and
the call-by-call replay of the decoding tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def arrays(*shapes, seed=0, scale=1.0):
  """Standard normal float32 arrays of the given shapes (times scale)."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for s in shapes)


@functools.partial(jax.jit, static_argnames='fn')
def vjp(fn, args, dout):
  """(fn(*args), the cotangents of args for output cotangent dout)."""
  out, pullback = jax.vjp(fn, *args)
  return out, pullback(dout)


def close(got, want, what, rtol=1e-5):
  """max |got - want| <= rtol * max |want| (+ 1e-7), in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err, top = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rtol * top + 1e-7, f'{what}: max error {err:.3g} (max |reference| {top:.3g})'


def replay(step, cache, sequences, schedule):
  """Runs step(*new, cache, segment_ids) over the rows' sequences, call by call (decoding tests).

  Args:
    step: (the new positions of each array in sequences, cache, segment_ids [B, T]) -> (out
      [B, T, ...], cache).
    cache: the empty cache.
    sequences: arrays [B, L, ...] (q first), fed position by position.
    schedule: per call, the number of real new positions of each row; a call's T is their max,
      the rest of a row's block is loud noise (padding) that must reach neither a real output nor
      the cache.
  Returns:
    outputs [B, L, ...] at the fed positions (NaN elsewhere) and the final cache.
  """
  b, length = sequences[0].shape[:2]
  got = None
  cur = np.zeros(b, int)
  noise = np.random.default_rng(7)
  for counts in schedule:
    t = max(counts)
    index = np.minimum(cur[:, None] + np.arange(t), length - 1)            # [B, T]
    real = np.arange(t)[None] < np.asarray(counts)[:, None]                # [B, T]

    def take(x):
      x = np.asarray(x)[np.arange(b)[:, None], index]
      return jnp.asarray(np.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), x,
                                  30 * noise.standard_normal(x.shape)), x.dtype)

    out, cache = step(*map(take, sequences), cache, jnp.asarray(real, jnp.int32))
    out = np.asarray(out)
    assert np.isfinite(out).all(), 'padding made a non-finite output'
    got = np.full((b, length) + out.shape[2:], np.nan) if got is None else got
    rows, cols = np.nonzero(real)
    got[rows, index[rows, cols]] = out[rows, cols]
    cur += counts
  np.testing.assert_array_equal(cache['length'], cur)
  return got, cache
