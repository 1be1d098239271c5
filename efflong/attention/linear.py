"""Kernel (linear) attention (Katharopoulos et al. 2020, "Transformers are RNNs", Sec. 3.2).

With a non-negative feature map phi,

  out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i),   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j),

the sums over the keys j that query i sees. Bidirectional without segments, S and z are one sum over the
sequence. Causal (Sec. 3.3), the sums are prefix sums, computed chunkwise: inside a chunk of C tokens
the C x C kernel matrix is masked directly; across chunks a scan carries the running (S, z), so memory
is O(T * H + (T / C) * M * H), never O(T * M * H). Segments (padding, packing) must be contiguous runs
of equal ids, as packing makes them: the carried state is that of the run open at the chunk's end, and a
query uses it only when it is in that run. Bidirectional with segments is a causal pass plus an
anti-causal pass (the reversed sequence, excluding the diagonal).

The core `attend_features` takes the features; `attend` is the Linear Transformer (phi = elu + 1 or
relu); `performer` supplies FAVOR+ features to the same core. Decoding (`init_cache`, `attend_step`,
`step_features`) keeps the recurrent state (S, z) of Sec. 3.4 per row and advances it with the same
chunked prefix sums started from it: O(M H) memory and work per token, flat in the context.
With impl='pallas' the causal prefix sums run in the Pallas kernels of
`efflong.kernels.linear_attention` (`_prefix` here is their XLA twin).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from efflong import errors, kernels
from efflong.attention import dense
from efflong.kernels import linear_attention
from efflong.mask import Mask

EPS = 1e-6  # The Linear Transformer's denominator epsilon: relu features may see no key mass.

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'elu': lambda x: jax.nn.elu(x) + 1.0,
    'relu': jax.nn.relu,
}


def _check_chunk(chunk: int) -> None:
  if not isinstance(chunk, int) or chunk < 1:
    raise errors.Error(f'chunk={chunk!r} must be a positive integer.')


def _group(x: jax.Array, kh: int) -> jax.Array:
  """[B, T, N, F] -> [B, T, K, G, F]: the G query heads of each kv head."""
  b, t, n, f = x.shape
  return x.reshape(b, t, kh, n // kh, f)


class Carry(NamedTuple):
  """The prefix sums' carry: the state of the run open at the last position processed.

  Attributes:
    s: [B, K, M, H] sum of phi(k_j) v_j^T over the run's keys so far (times exp(-scale)).
    z: [B, K, M] sum of phi(k_j) (times exp(-scale)).
    open_id: [B] the run's segment id.
    scale: [B, K] the key scale of the run's last position (see `_prefix`; zeros without one).
  """

  s: jax.Array
  z: jax.Array
  open_id: jax.Array
  scale: jax.Array


def _prefix(qf: jax.Array, kf: jax.Array, v: jax.Array, seg: jax.Array, *, chunk: int,
            strict: bool, key_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Causal numerator and denominator: sums over keys j <= i (j < i if strict) in i's run.

  Args:
    qf: [B, T, K, G, M] query features.
    kf: [B, T, K, M] key features.
    v: [B, T, K, H].
    seg: [B, T] int segment ids, in contiguous runs.
    chunk: C.
    strict: leave out j == i.
    key_scale: None, or s [B, T, K], non-decreasing along each run: key j's features are
      exp(-s_j) times the true ones, and query i's sums are returned times exp(-s_i) (the pair
      (i, j) is weighted by exp(s_j - s_i) <= 1; a running max keeps every term finite, as the
      online softmax does). The common factor exp(-s_i) cancels in num / den.
  Returns:
    num [B, T, K, G, H] and den [B, T, K, G], float32.
  """
  b, _, kh, _, m = qf.shape
  empty = Carry(jnp.zeros((b, kh, m, v.shape[-1]), jnp.float32), jnp.zeros((b, kh, m), jnp.float32),
                jnp.full((b,), -2, seg.dtype), jnp.zeros((b, kh), jnp.float32))
  return _prefix_from(qf, kf, v, seg, empty, chunk=chunk, strict=strict, key_scale=key_scale)[:2]


def _prefix_from(qf: jax.Array, kf: jax.Array, v: jax.Array, seg: jax.Array, carry: Carry, *,
                 chunk: int, strict: bool, key_scale: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, Carry]:
  """`_prefix` started from a carry (a decoding cache's state, or none: open_id matching no
  id); also returns the carry after the last position, that of the run open there."""
  b, t, kh = qf.shape[:3]
  pad = -t % chunk
  nc = (t + pad) // chunk

  def to_chunks(x: jax.Array, mode: str = 'constant') -> jax.Array:  # [B, T, ..] -> [nC, B, C, ..]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), mode=mode)
    return jnp.moveaxis(x.reshape(b, nc, chunk, *x.shape[2:]), 1, 0)

  # The tail padding continues the last run (its id and scale) with zero features: it changes no
  # sum, and the final carry is the last run's state.
  scale = jnp.zeros((b, t, kh), jnp.float32) if key_scale is None else key_scale
  xs = (to_chunks(qf), to_chunks(kf), to_chunks(v), to_chunks(seg, 'edge'),
        to_chunks(scale, 'edge'))
  tri = jnp.tril(jnp.ones((chunk, chunk), bool), -1 if strict else 0)

  def rescale(ok: jax.Array, log: jax.Array) -> jax.Array:
    """exp(log) where ok, else 0 (just ok without a key scale: XLA drops the unused log). A true
    log is <= 0 (the scale grows along a run); the clamp keeps an id that recurs after a gap
    (padding between packed sequences) finite."""
    if key_scale is None:
      return ok.astype(jnp.float32)
    return jnp.where(ok, jnp.exp(jnp.minimum(jnp.where(ok, log, 0.0), 0.0)), 0.0)

  def body(carry, x):
    s, z, open_id, open_scale = carry               # [B, K, M, H], [B, K, M], [B], [B, K]
    q_c, k_c, v_c, seg_c, sc_c = x                  # [B, C, K, G, M], [B, C, K, M], ..., [B, C, K]
    same = (seg_c[:, :, None] == seg_c[:, None, :]) & tri   # [B, C, C] query x key
    weight = rescale(same[:, None], jnp.moveaxis(sc_c, 2, 1)[:, :, None, :]
                     - jnp.moveaxis(sc_c, 2, 1)[:, :, :, None])           # [B, K, C, D]
    a = jnp.einsum('BCKGM,BDKM->BKGCD', q_c, k_c) * weight[:, :, None]
    from_carry = rescale((seg_c == open_id[:, None])[..., None],
                         open_scale[:, None] - sc_c)                       # [B, C, K]
    num = (jnp.einsum('BKGCD,BDKH->BCKGH', a, v_c)
           + jnp.einsum('BCKGM,BKMH->BCKGH', q_c, s) * from_carry[..., None, None])
    den = (a.sum(-1).transpose(0, 3, 1, 2)
           + jnp.einsum('BCKGM,BKM->BCKG', q_c, z) * from_carry[..., None])
    # The run open at the chunk's end: its keys in this chunk, plus the carry if it continues it,
    # all brought to the scale of the chunk's last position.
    last, last_scale = seg_c[:, -1], sc_c[:, -1]
    in_last = rescale((seg_c == last[:, None])[..., None], sc_c - last_scale[:, None])  # [B, C, K]
    keep = rescale((last == open_id)[:, None], open_scale - last_scale)               # [B, K]
    s = s * keep[..., None, None] + jnp.einsum('BCKM,BCKH,BCK->BKMH', k_c, v_c, in_last)
    z = z * keep[..., None] + jnp.einsum('BCKM,BCK->BKM', k_c, in_last)
    return Carry(s, z, last, last_scale), (num, den)

  carry, (num, den) = jax.lax.scan(body, carry, xs)
  from_chunks = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, nc * chunk, *x.shape[3:])[:, :t]
  return from_chunks(num), from_chunks(den), carry


def attend_features(qf: jax.Array, kf: jax.Array, v: jax.Array, *, mask: Mask,
                    chunk: int = 64, eps: float = EPS, key_scale: jax.Array | None = None,
                    impl: str = 'xla') -> jax.Array:
  """out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps) over the keys query i sees.

  Args:
    qf: [B, T, N, M] non-negative query features.
    kf: [B, S, K, M] non-negative key features; K divides N.
    v: [B, S, K, H].
    mask: causal flag and segment ids (contiguous runs); causal or segmented needs T == S.
    chunk: C, tokens per chunk of the causal / segmented path (any C; T is padded).
    eps: added to the denominator (at the features' own scale); a zero denominator gives a zero
      output, never NaN.
    key_scale: causal only: None, or a running log-scale s [B, S, K] of the key features (see
      `_prefix`; FAVOR+'s running-max stabiliser). XLA only: impl='pallas' refuses it and 'auto'
      takes XLA.
    impl: the causal / segmented prefix sums: 'xla' (the lax.scan twin) or 'pallas'
      (efflong.kernels.linear_attention).
  Returns:
    [B, T, N, H] float32.
  """
  _check_chunk(chunk)
  if key_scale is not None:
    if not mask.causal:
      raise errors.Error('key_scale (a running log-scale of the keys) needs a causal mask.')
    if impl == 'pallas':
      raise errors.Error("a running key scale (performer, causal) has no Pallas path yet; use "
                         "attention_impl='xla' or 'auto'.")
    if kernels.resolve(impl) == 'pallas':
      logging.log_first_n(logging.WARNING, 'kernel attention: the running key scale (performer, '
                          'causal) runs in XLA, not the Pallas kernel.', 1)
    impl = 'xla'
  impl = kernels.resolve(impl)
  b, t, n, _ = qf.shape
  kh = kf.shape[2]
  qf = _group(qf.astype(jnp.float32), kh)
  kf, vf = kf.astype(jnp.float32), v.astype(jnp.float32)
  if mask.global_tokens is not None:
    raise errors.Error("kernel attention has no global tokens, but the mask (the batch field "
                       "'global_tokens') sets some; use longformer or bigbird.")
  seg = mask.q_segment_ids
  if not mask.causal and seg is None and mask.kv_segment_ids is None:
    s = jnp.einsum('BSKM,BSKH->BKMH', kf, vf)
    num = jnp.einsum('BTKGM,BKMH->BTKGH', qf, s)
    den = jnp.einsum('BTKGM,BSKM->BTKG', qf, kf)
  else:
    if kf.shape[1] != t or (seg is None) != (mask.kv_segment_ids is None):
      raise errors.Error('kernel attention with a causal mask or segment ids needs self-attention '
                         f'(T == S, one segment id array); got T={t}, S={kf.shape[1]}.')
    seg = jnp.zeros((b, t), jnp.int32) if seg is None else seg
    prefix = linear_attention.prefix if impl == 'pallas' else _prefix
    scaled = {} if key_scale is None else dict(key_scale=key_scale)   # XLA only, see above
    num, den = prefix(qf, kf, vf, seg, chunk=chunk, strict=False, **scaled)
    if not mask.causal:
      flip = lambda x: jnp.flip(x, axis=1)
      back_num, back_den = prefix(flip(qf), flip(kf), flip(vf), flip(seg), chunk=chunk,
                                  strict=True)
      num, den = num + flip(back_num), den + flip(back_den)
  return _ratio(num, den, eps).reshape(b, t, n, -1)


def _ratio(num: jax.Array, den: jax.Array, eps: float) -> jax.Array:
  """num / (den + eps), [..., H] / [...]; zeros where the denominator is zero."""
  den = den + eps
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def _feature_map(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in FEATURE_MAPS:
    raise errors.Error(f'feature_map={name!r}; valid: {sorted(FEATURE_MAPS)}.')
  return FEATURE_MAPS[name]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, feature_map: str = 'elu',
           chunk: int = 64, impl: str = 'xla') -> jax.Array:
  """Linear Transformer attention with phi = elu + 1 (the paper's) or relu.

  Args:
    q: [B, T, N, H].
    k, v: [B, S, K, H]; K divides N.
    mask: causal flag and segment ids (contiguous runs).
    feature_map: 'elu' or 'relu'.
    chunk: C of the chunked prefix sums.
    impl: 'xla' (the lax.scan twin) or 'pallas' (efflong.kernels.linear_attention).
  Returns:
    [B, T, N, H].
  """
  dense.check_shapes(q, k, v, mask)
  phi = _feature_map(feature_map)
  qf = phi(q.astype(jnp.float32))
  kf = phi(k.astype(jnp.float32))
  return attend_features(qf, kf, v, mask=mask, chunk=chunk, impl=impl).astype(q.dtype)


def empty_state(batch: int, kv_heads: int, features: int, head_dim: int) -> dict[str, jax.Array]:
  """The decoding cache of kernel attention before any position: 'length' [B] int32 and the
  prefix sums 's' [B, K, M, H] = sum phi(k) v^T and 'z' [B, K, M] = sum phi(k), float32."""
  return {'length': jnp.zeros((batch,), jnp.int32),
          's': jnp.zeros((batch, kv_heads, features, head_dim), jnp.float32),
          'z': jnp.zeros((batch, kv_heads, features), jnp.float32)}


def step_features(qf: jax.Array, kf: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                  mask: Mask, chunk: int, eps: float, key_scale: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal kernel attention of new positions continuing a cache's prefix sums (Sec. 3.4).

  The new positions are one run continuing the cached one, through the chunked prefix sums
  started from the cache's state (a decode step, T = 1, is one O(M H) update, flat in context).

  Args:
    qf: [B, T, N, M] the new positions' query features.
    kf: [B, T, K, M] their key features (any value at padding: it is dropped here).
    v: [B, T, K, H].
    cache: 'length', 's', 'z' (`empty_state`), and 'scale' [B, K] with a key scale.
    mask: q_segment_ids [B, T]: 1 on real new positions, 0 on right-padding (None: all real).
    chunk: C of the prefix sums (at most T is used).
    eps: added to the denominator, as in `attend_features`.
    key_scale: None, or [B, T, K] the running log-scale of kf continuing cache['scale'] (see
      `_prefix`).
  Returns:
    out [B, T, N, H] float32, equal to the causal `attend_features` over all the row's positions
    at each real new one, and the cache advanced past the real positions (padding adds nothing).
  """
  _check_chunk(chunk)
  b, t, n, _ = qf.shape
  kh = kf.shape[2]
  if (key_scale is None) != ('scale' not in cache):
    raise errors.Error('kernel attention decoding: the cache has a key scale exactly when the '
                       'features have one (init_cache and attend_step disagree on the kernel).')
  real = jnp.ones((b, t), bool) if mask.q_segment_ids is None else mask.q_segment_ids != 0
  kf = jnp.where(real[..., None, None], kf.astype(jnp.float32), 0.0)
  run = jnp.ones((b, t), jnp.int32)  # One run: the row's sequence, padding included (it adds 0).
  carry = Carry(cache['s'], cache['z'], run[:, 0], cache.get('scale', jnp.zeros((b, kh))))
  num, den, carry = _prefix_from(_group(qf.astype(jnp.float32), kh), kf, v.astype(jnp.float32),
                                 run, carry, chunk=min(chunk, t), strict=False,
                                 key_scale=key_scale)
  new = dict(cache, length=cache['length'] + real.sum(1, dtype=jnp.int32), s=carry.s, z=carry.z)
  if key_scale is not None:
    new['scale'] = carry.scale
  return _ratio(num, den, eps).reshape(b, t, n, -1), new


def init_cache(batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
               dtype: Any) -> dict[str, jax.Array]:
  """The empty decoding cache (`empty_state`, M = H): O(1) in max_len."""
  del max_len, dtype  # The prefix sums are float32 and do not grow.
  return empty_state(batch, num_kv_heads, head_dim, head_dim)


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, feature_map: str = 'elu', chunk: int = 64
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`attend` (causal) for new positions q [B, T, N, H], k, v [B, T, K, H] after the cached ones.

  Returns out [B, T, N, H] and the advanced cache; see `step_features`.
  """
  phi = _feature_map(feature_map)
  out, cache = step_features(phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32)), v, cache,
                             mask=mask, chunk=chunk, eps=EPS)
  return out.astype(q.dtype), cache
