"""Performer attention, FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

Softmax attention exp(q^T k / sqrt(H)) is approximated by positive random features (Sec. 2.3, Lemma 1):
with x scaled by H^(-1/4) and the M rows w of W,

  phi(x) = exp(W x - |x|^2 / 2) / sqrt(M),   E[phi(q)^T phi(k)] = exp(q^T k / sqrt(H)),

and the kernelised formula of `linear.attend_features` (one core for both families, causal and not).
Orthogonal random features (Sec. 2.4): W is built from blocks of H orthogonal rows (QR of a Gaussian
matrix), each row rescaled to the norm of an H-dimensional Gaussian vector (chi distribution), which
keeps each row's marginal and lowers the variance. A max is subtracted inside exp for stability:
per query row for queries, one per (batch, head) for keys, so it cancels in the ratio.

The feature matrix W [M, H] is a non-trainable variable of `FeatureMatrix`, the family's module; the
trainer redraws it every `redraw_every` steps (`redraw`), and it is saved with the checkpoints.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efflong.attention import dense, linear
from efflong.mask import Mask

KERNELS = ('softmax', 'relu')


def draw(key: jax.Array, nb_features: int, head_dim: int, *, orthogonal: bool) -> jax.Array:
  """W [M, H]: iid N(0, I) rows, or orthogonal blocks of H rows with chi-distributed norms."""
  if not isinstance(nb_features, int) or nb_features < 1:
    raise ValueError(f'nb_features={nb_features!r} must be a positive integer.')
  gauss_key, norm_key = jax.random.split(key)
  if not orthogonal:
    return jax.random.normal(gauss_key, (nb_features, head_dim), jnp.float32)
  blocks = -(-nb_features // head_dim)
  gauss = jax.random.normal(gauss_key, (blocks, head_dim, head_dim), jnp.float32)
  rows = jnp.swapaxes(jnp.linalg.qr(gauss)[0], 1, 2).reshape(blocks * head_dim, head_dim)
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (nb_features, head_dim), jnp.float32), axis=1)
  return rows[:nb_features] * norms[:, None]


def features(x: jax.Array, w: jax.Array, *, kernel: str, is_query: bool) -> jax.Array:
  """phi(x) [B, T, N, M] for x [B, T, N, H] and W [M, H]."""
  m, h = w.shape
  x = x.astype(jnp.float32) * h ** -0.25
  proj = jnp.einsum('BTNH,MH->BTNM', x, w)
  if kernel == 'relu':
    return jax.nn.relu(proj) * m ** -0.5
  logits = proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  axes = (-1,) if is_query else (1, -1)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=axes, keepdims=True))
  return jnp.exp(logits - peak) * m ** -0.5


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, projection: jax.Array,
           kernel: str = 'softmax', chunk: int = 64, impl: str = 'xla') -> jax.Array:
  """FAVOR+ attention with a given feature matrix.

  Args:
    q: [B, T, N, H].
    k, v: [B, S, K, H]; K divides N.
    mask: causal flag and segment ids (contiguous runs).
    projection: W [M, H], from `FeatureMatrix` (or `draw`).
    kernel: 'softmax' (positive random features) or 'relu' (the generalised ReLU kernel).
    chunk: C of the chunked prefix sums.
    impl: 'xla' (the lax.scan twin) or 'pallas' (efflong.kernels.linear_attention).
  Returns:
    [B, T, N, H].
  """
  dense.check_shapes(q, k, v, mask)
  if kernel not in KERNELS:
    raise ValueError(f'kernel={kernel!r}; valid: {list(KERNELS)}.')
  if projection.ndim != 2 or projection.shape[1] != q.shape[-1]:
    raise ValueError(f'projection has shape {projection.shape}; expected [M, H={q.shape[-1]}].')
  qf = features(q, projection, kernel=kernel, is_query=True)
  kf = features(k, projection, kernel=kernel, is_query=False)
  eps = linear.EPS if kernel == 'relu' else 0.0   # The stabiliser's scale would make EPS matter.
  return linear.attend_features(qf, kf, v, mask=mask, chunk=chunk, eps=eps,
                               impl=impl).astype(q.dtype)


class RandomFeatures(nnx.Variable):
  """A non-trainable variable: the optimizer leaves it alone, checkpoints keep it."""


class FeatureMatrix(nnx.Module):
  """Owns W [M, H]; x [B, T, D] -> {'projection': W}. The module function `redraw` renews it."""

  def __init__(self, *, nb_features: int, orthogonal: bool, redraw_every: int, head_dim: int,
               rngs: nnx.Rngs):
    if not isinstance(redraw_every, int) or redraw_every < 0:
      raise ValueError(f'redraw_every={redraw_every!r} must be an int >= 0 (0: never).')
    self.nb_features, self.head_dim, self.orthogonal = nb_features, head_dim, orthogonal
    self.redraw_every = redraw_every
    self.projection = RandomFeatures(draw(rngs.params(), nb_features, head_dim,
                                          orthogonal=orthogonal))

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    del x
    return {'projection': self.projection[...]}


def feature_matrix(hyper: dict[str, Any], *, nb_features: int = 256, orthogonal: bool = True,
                   redraw_every: int = 0, head_dim: int, rngs: nnx.Rngs,
                   **layer: Any) -> FeatureMatrix:
  """The family module; nb_features, orthogonal and redraw_every are its hyper-parameters."""
  del hyper, layer
  return FeatureMatrix(nb_features=nb_features, orthogonal=orthogonal, redraw_every=redraw_every,
                       head_dim=head_dim, rngs=rngs)


def redraw(model: nnx.Module, key: jax.Array, step: jax.Array) -> None:
  """Redraws every FeatureMatrix of model whose redraw_every divides step (step > 0), in place.

  Each module gets its own key (fold_in of its index), so layers draw independent features.
  """
  for i, (_, module) in enumerate(nnx.iter_graph(model)):
    if isinstance(module, FeatureMatrix) and module.redraw_every:
      fresh = draw(jax.random.fold_in(key, i), module.nb_features, module.head_dim,
                   orthogonal=module.orthogonal)
      due = (step > 0) & (step % module.redraw_every == 0)
      module.projection[...] = jnp.where(due, fresh, module.projection[...])
