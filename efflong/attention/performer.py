"""Performer attention, FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

Softmax attention exp(q^T k / sqrt(H)) is approximated by positive random features (Sec. 2.3, Lemma 1):
with x scaled by H^(-1/4) and the M rows w of W,

  phi(x) = exp(W x - |x|^2 / 2) / sqrt(M),   E[phi(q)^T phi(k)] = exp(q^T k / sqrt(H)),

and the kernelised formula of `linear.attend_features` (one core for both families, causal and not).
Orthogonal random features (Sec. 2.4): W is built from blocks of H orthogonal rows (QR of a Gaussian
matrix), each row rescaled to the norm of an H-dimensional Gaussian vector (chi distribution), which
keeps each row's marginal and lowers the variance.

Stabiliser: a max is subtracted inside exp, per row for queries (it cancels in each query's ratio)
and, for keys, over only the keys a query may combine them with (`key_features`): the key's own
segment bidirectionally, the running max up to the key when causal (rescaled as the prefix sums
advance, like the online softmax). The reference implementations (the authors' and
performer-pytorch) take one max over all keys, future keys and other packed sequences included,
which can underflow every key a query sees and leave it a silent zero row (tests/attention/
test_performer.py builds such rows). No epsilon is added to softmax features (see `attend`).

Decoding (`init_cache`, `attend_step`): the cache is linear's recurrent state (S, z) plus, for softmax
features, the running log-scale of the keys so far ('scale' [B, K]). Nothing changes from the
parallel causal form: its stabiliser is already the running max, which never looks at a future key,
so a decoded token's features, and its output, are those of the causal `attend` over the whole
sequence (to float rounding, tests/attention/test_decode_linear.py). The cache belongs to the W it
was filled with: a redraw (training only) invalidates it.

`redraw_every` defaults to 0: the features are drawn once per layer and kept (saved with the
checkpoints). The paper redraws them periodically during training; set e.g. redraw_every=1000.

The feature matrix W [M, H] is a non-trainable variable of `FeatureMatrix`, the family's module; the
trainer redraws it every `redraw_every` steps (`redraw`), and it is saved with the checkpoints.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efflong import errors
from efflong.attention import dense, linear
from efflong.mask import Mask

KERNELS = ('softmax', 'relu')
EMPTY_SCALE = -1e30  # The running log-scale of the softmax key features before any key.


def draw(key: jax.Array, nb_features: int, head_dim: int, *, orthogonal: bool) -> jax.Array:
  """W [M, H]: iid N(0, I) rows, or orthogonal blocks of H rows with chi-distributed norms."""
  if not isinstance(nb_features, int) or nb_features < 1:
    raise errors.Error(f'nb_features={nb_features!r} must be a positive integer.')
  gauss_key, norm_key = jax.random.split(key)
  if not orthogonal:
    return jax.random.normal(gauss_key, (nb_features, head_dim), jnp.float32)
  blocks = -(-nb_features // head_dim)
  gauss = jax.random.normal(gauss_key, (blocks, head_dim, head_dim), jnp.float32)
  q, r = jnp.linalg.qr(gauss)
  # Q times the signs of diag(R) is Haar-distributed (Mezzadri 2007); Q alone is not: its rows
  # lean towards one direction, and E[exp(w . a)] drifts from exp(|a|^2 / 2).
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, 1, 2).reshape(blocks * head_dim, head_dim)
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (nb_features, head_dim), jnp.float32), axis=1)
  return rows[:nb_features] * norms[:, None]


def _projections(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x' = x H^(-1/4) and W x' [..., M], for x [..., H] and W [M, H]."""
  x = x.astype(jnp.float32) * w.shape[1] ** -0.25
  return x, jnp.einsum('...H,MH->...M', x, w)


def _exponents(x: jax.Array, w: jax.Array) -> jax.Array:
  """W x' - |x'|^2 / 2 [..., M] (see `_projections`)."""
  x, projected = _projections(x, w)
  return projected - 0.5 * jnp.einsum('...H,...H->...', x, x)[..., None]


def query_features(q: jax.Array, w: jax.Array, *, kernel: str) -> jax.Array:
  """phi(q) [..., M] for q [..., H] (e.g. [B, T, N, H]); softmax features stabilised per row (a
  factor that cancels in each query's ratio)."""
  m = w.shape[0]
  if kernel == 'relu':
    return jax.nn.relu(_projections(q, w)[1]) * m ** -0.5
  e = _exponents(q, w)
  # 1 / sqrt(M) inside the exp: an exp last lets XLA:CPU write the features once, where their
  # matmul reads them (see linear.elu1).
  return jnp.exp(e - jax.lax.stop_gradient(jnp.max(e, axis=-1, keepdims=True)) - 0.5 * math.log(m))


def _run_max(x: jax.Array, seg: jax.Array, *, causal: bool) -> jax.Array:
  """x [B, S, K] -> the max over each position's run of equal ids seg [B, S] (contiguous runs):
  over the run's positions up to and including it (causal), or over the whole run."""
  ids = jnp.broadcast_to(seg[..., None], x.shape)

  def combine(a, b):   # A segmented max scan: a run restarts the max.
    (va, ia), (vb, ib) = a, b
    return jnp.where(ia == ib, jnp.maximum(va, vb), vb), ib

  forward, _ = jax.lax.associative_scan(combine, (x, ids), axis=1)
  if causal:
    return forward
  backward, _ = jax.lax.associative_scan(combine, (forward, ids), axis=1, reverse=True)
  return backward


def key_features(k: jax.Array, w: jax.Array, *, kernel: str, mask: Mask,
                 start: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """phi(k) [B, S, K, M] for k [B, S, K, H], and the running log-scale of a causal mask (or None).

  The softmax features are stabilised by a max that sees only keys a query may combine them with:
  the max over the key's own run (segment) bidirectionally, a constant that cancels in the ratio;
  under a causal mask the running max up to the key (`linear._prefix`'s key_scale), so no future
  key and no other packed sequence can shrink a visible key's features to zero.

  start: decoding (causal): None, or [B, K] the running log-scale before these keys (a cache's,
  EMPTY_SCALE before any key). The keys then continue that one run, and padding
  (mask.q_segment_ids 0) stays out of the max (`linear.step_features` drops its features).
  """
  m = w.shape[0]
  if kernel == 'relu':
    return query_features(k, w, kernel=kernel), None
  e = _exponents(k, w)
  top = jnp.max(e, axis=-1)
  if start is None and mask.kv_segment_ids is None:   # One run: a prefix max, or one max.
    scale = (jax.lax.cummax(top, axis=1) if mask.causal
             else jnp.broadcast_to(jnp.max(top, axis=1, keepdims=True), top.shape))
  elif start is None:
    scale = _run_max(top, mask.kv_segment_ids, causal=mask.causal)
  else:
    real = (jnp.ones(k.shape[:2], bool) if mask.q_segment_ids is None
            else mask.q_segment_ids != 0)
    scale = jnp.maximum(start[:, None],
                        jax.lax.cummax(jnp.where(real[..., None], top, EMPTY_SCALE), axis=1))
  scale = jax.lax.stop_gradient(scale)
  return jnp.exp(e - scale[..., None]) * m ** -0.5, scale if mask.causal else None


def _check(q: jax.Array, kernel: str, projection: jax.Array) -> None:
  if kernel not in KERNELS:
    raise errors.Error(f'kernel={kernel!r}; valid: {list(KERNELS)}.')
  if projection.ndim != 2 or projection.shape[1] != q.shape[-1]:
    raise errors.Error(f'projection has shape {projection.shape}; expected [M, H={q.shape[-1]}].')


def _eps(kernel: str) -> float:
  """The denominator epsilon: linear.EPS for relu features, none for softmax ones (see `attend`)."""
  return linear.EPS if kernel == 'relu' else 0.0


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
    impl: 'xla' (the lax.scan twin) or 'pallas' (efflong.kernels.linear_attention); causal
      softmax features carry a running scale, which only XLA takes ('auto' takes XLA there).
  Returns:
    [B, T, N, H]. Without segment ids (and in XLA when causal) through `linear.fused`, the
    features computed chunk by chunk (the same stabilisers: the key features as logs), else
    through `linear.attend_features`.
  """
  dense.check_shapes(q, k, v, mask)
  _check(q, kernel, projection)
  softmax = kernel == 'softmax'
  if linear.can_fuse(mask, impl, q.shape[1], k.shape[1], log_keys=softmax):
    queries = functools.partial(query_features, w=projection, kernel=kernel)
    keys = functools.partial(_exponents, w=projection) if softmax else queries
    f32 = lambda x: x.astype(jnp.float32)
    return linear.fused(f32(q), f32(k), f32(v), query_features=queries, key_features=keys,
                        log_keys=softmax, causal=mask.causal, chunk=chunk,
                        eps=_eps(kernel)).astype(q.dtype)
  qf = query_features(q, projection, kernel=kernel)
  kf, scale = key_features(k, projection, kernel=kernel, mask=mask)
  # No denominator epsilon for softmax features: each query row's and each key run's largest
  # feature is 1 / sqrt(M), but they may sit on different features, so phi(q)^T z can be far
  # below any fixed epsilon, which would then bias the output (up to 0.4% in
  # tests/attention/test_performer.py with 1e-6). A zero denominator gives zeros, never NaN.
  return linear.attend_features(qf, kf, v, mask=mask, chunk=chunk, eps=_eps(kernel),
                                key_scale=scale, impl=impl).astype(q.dtype)


def init_cache(batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype: Any,
               kernel: str = 'softmax', nb_features: int = 256) -> dict[str, jax.Array]:
  """The empty decoding cache: `linear.empty_state` with M = nb_features, and for softmax
  features the running log-scale 'scale' [B, K] (EMPTY_SCALE: no key yet). O(1) in max_len."""
  del max_len, dtype  # The state is float32 and does not grow.
  if kernel not in KERNELS:
    raise errors.Error(f'kernel={kernel!r}; valid: {list(KERNELS)}.')
  cache = linear.empty_state(batch, num_kv_heads, nb_features, head_dim)
  if kernel == 'softmax':
    cache['scale'] = jnp.full((batch, num_kv_heads), EMPTY_SCALE, jnp.float32)
  return cache


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, projection: jax.Array, kernel: str = 'softmax', chunk: int = 64
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`attend` (causal) for new positions q [B, T, N, H], k, v [B, T, K, H] after the cached ones;
  the same W as the cache was filled with. Returns out [B, T, N, H] and the advanced cache (see
  `linear.step_features`)."""
  _check(q, kernel, projection)
  if cache['s'].shape[2] != projection.shape[0]:
    raise errors.Error(f'performer cache holds {cache["s"].shape[2]} features but projection has '
                       f'{projection.shape[0]} rows; init_cache(nb_features=) must match.')
  qf = query_features(q, projection, kernel=kernel)
  kf, scale = key_features(k, projection, kernel=kernel, mask=mask, start=cache.get('scale'))
  out, cache = linear.step_features(qf, kf, v, cache, mask=mask, chunk=chunk, eps=_eps(kernel),
                                    key_scale=scale)
  return out.astype(q.dtype), cache


class RandomFeatures(nnx.Variable):
  """A non-trainable variable: the optimizer leaves it alone, checkpoints keep it."""


class FeatureMatrix(nnx.Module):
  """Owns W [M, H]; x [B, T, D] -> {'projection': W}. The module function `redraw` renews it."""

  def __init__(self, *, nb_features: int, orthogonal: bool, redraw_every: int, head_dim: int,
               rngs: nnx.Rngs):
    if not isinstance(redraw_every, int) or redraw_every < 0:
      raise errors.Error(f'redraw_every={redraw_every!r} must be an int >= 0 (0: never).')
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
