"""Position-wise feed-forward: D -> d_ff -> D."""

from __future__ import annotations

import jax
from flax import nnx

from efflong.nn.layers import Dtype, dense, dropout

ACTIVATIONS = {'gelu': nnx.gelu, 'relu': nnx.relu}


class FeedForward(nnx.Module):
  """Linear, activation, dropout, Linear."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str, dropout_rate: float, dtype: Dtype,
               rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f'unknown model.activation {activation!r}; valid: {sorted(ACTIVATIONS)}.')
    self.activation = ACTIVATIONS[activation]
    self.dropout_rate = dropout_rate
    self.wi = dense(d_model, d_ff, ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.wo = dense(d_ff, d_model, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, key: jax.Array | None) -> jax.Array:
    """[B, T, D] -> [B, T, D]; key drives dropout (None: deterministic)."""
    return self.wo(dropout(self.activation(self.wi(x)), self.dropout_rate, key))
