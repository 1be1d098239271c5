"""Reversible stacks against plain autodiff of the same recurrence; chunked feed-forward."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import config as config_lib
from efflong import models
from efflong.nn import reversible
from efflong.nn.feedforward import FeedForward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, T, D = 2, 10, 32


def _config(kind, attention='dense', **model):
  config = config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config(
      f'smoke,attention={attention},seq_len={T}')
  config.model.update(kind=kind, reversible=True, num_layers=3, dropout_rate=0.1, **model)
  return config


def _stack_and_inputs(kind, attention, dtype):
  """The reversible stack of a smoke model, its split state (cast to dtype) and inputs."""
  model = models.build(_config(kind, attention, dtype=jnp.dtype(dtype).name), rngs=nnx.Rngs(0))
  stack = model.decoder if kind == 'encoder_decoder' else model.stack
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, T, D)), dtype)
  context = jnp.asarray(rng.standard_normal((B, T + 3, D)), dtype) if kind == 'encoder_decoder' \
      else None
  seg = np.ones((B, T), np.int32)
  seg[0, T - 3:] = 0
  aux = (jnp.asarray(seg), None, None if context is None else jnp.ones((B, T + 3), jnp.int32),
         jax.random.key(7))
  return graphdef, len(stack.layers), params, rest, x, context, aux


def _compare(kind, attention, dtype, tol):
  graphdef, n, params, rest, x, context, aux = _stack_and_inputs(kind, attention, dtype)
  fns = reversible.layer_fns(graphdef, n)
  fast = reversible.make(graphdef, n)
  loss = lambda run: lambda p, x, c: sum(jnp.sum(jnp.sin(y)) for y in run(p, rest, x, x, c, aux))
  plain = lambda p, r, x1, x2, c, a: reversible.forward(fns, p, r, x1, x2, c, a)
  argnums = (0, 1) if context is None else (0, 1, 2)
  want, want_g = jax.jit(jax.value_and_grad(loss(plain), argnums))(params, x, context)
  got, got_g = jax.jit(jax.value_and_grad(loss(fast), argnums))(params, x, context)
  np.testing.assert_allclose(got, want, rtol=tol)
  scale = max(np.abs(np.asarray(b)).max() for b in jax.tree.leaves(want_g))  # max |g|
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= tol * scale, (a.shape, scale)


@pytest.mark.parametrize('kind,attention', [('lm', 'dense'), ('encoder_decoder', 'dense'),
                                            ('lm', 'lsh')])
def test_recomputed_gradients_equal_autodiff_float32(kind, attention):
  """Dropout on, padding, a context for the decoder, LSH hash keys: all replay exactly."""
  _compare(kind, attention, jnp.float32, 1e-4)


def test_recomputed_gradients_equal_autodiff_float64():
  with jax.enable_x64(True):
    _compare('encoder_decoder', 'dense', jnp.float64, 1e-10)


def test_reversible_stack_needs_pre_ln():
  with pytest.raises(ValueError, match=r"model.reversible needs model.norm='pre'"):
    models.build(_config('lm', norm='post'), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('chunk', [3, 4, 20])
def test_chunked_feed_forward_equals_the_whole(chunk):
  """Values and gradients, chunks that do and do not divide T (no dropout: its masks are per chunk)."""
  make = lambda c: FeedForward(D, 64, activation='gelu', dropout_rate=0.0, dtype=jnp.float32,
                               rngs=nnx.Rngs(0), chunk_size=c)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, D)), jnp.float32)
  loss = lambda ff, x: jnp.sum(jnp.sin(ff(x, key=None)))
  whole, chunked = make(0), make(chunk)
  (v0, (g0, gx0)), (v1, (g1, gx1)) = (nnx.value_and_grad(loss, argnums=(0, 1))(m, x)
                                      for m in (whole, chunked))
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((gx1, g1)), jax.tree.leaves((gx0, g0))):
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(np.asarray(b)).max())


def test_bad_chunk_size():
  with pytest.raises(ValueError, match=r'model.ff_chunk_size=-1 must be an int >= 0'):
    FeedForward(D, 64, activation='gelu', dropout_rate=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0),
                chunk_size=-1)
