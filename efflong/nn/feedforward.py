"""Position-wise feed-forward: D -> d_ff -> D, optionally over length chunks (Reformer section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efflong import errors
from efflong.nn.layers import dense, dropout
from efflong.params import Dtype

ACTIVATIONS = {'gelu': nnx.gelu, 'relu': nnx.relu}


class FeedForward(nnx.Module):
  """Linear, activation, dropout, Linear.

  With chunk_size > 0 the positions are processed chunk_size at a time under jax.checkpoint, so the
  [B, T, d_ff] activation never exists whole, in the forward or the backward pass: its memory is
  O(B * chunk_size * d_ff). The dropout mask of chunk c is drawn from fold_in(key, c).
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str, dropout_rate: float, dtype: Dtype,
               rngs: nnx.Rngs, chunk_size: int = 0):
    if activation not in ACTIVATIONS:
      raise errors.Error(f'unknown model.activation {activation!r}; valid: {sorted(ACTIVATIONS)}.')
    if not isinstance(chunk_size, int) or chunk_size < 0:
      raise errors.Error(f'model.ff_chunk_size={chunk_size!r} must be an int >= 0 (0: no chunks).')
    self.activation = ACTIVATIONS[activation]
    self.dropout_rate = dropout_rate
    self.chunk_size = chunk_size
    self.wi = dense(d_model, d_ff, ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.wo = dense(d_ff, d_model, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def _apply(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return self.wo(dropout(self.activation(self.wi(x)), self.dropout_rate, key))

  def __call__(self, x: jax.Array, *, key: jax.Array | None) -> jax.Array:
    """[B, T, D] -> [B, T, D]; key drives dropout (None: deterministic)."""
    b, t, d = x.shape
    if not self.chunk_size or self.chunk_size >= t:
      return self._apply(x, key)
    n = -(-t // self.chunk_size)
    xs = jnp.pad(x, [(0, 0), (0, n * self.chunk_size - t), (0, 0)])
    xs = xs.reshape(b, n, self.chunk_size, d).swapaxes(0, 1)          # [n, B, C, D]
    step = jax.checkpoint(lambda xc, c: self._apply(
        xc, None if key is None else jax.random.fold_in(key, c)))
    out = jax.lax.map(lambda args: step(*args), (xs, jnp.arange(n)))
    return out.swapaxes(0, 1).reshape(b, n * self.chunk_size, d)[:, :t]
