"""Helpers shared by the attention tests: random inputs, a jitted vjp, a relative comparison."""

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
