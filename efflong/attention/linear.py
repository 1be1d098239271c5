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
relu); `performer` supplies FAVOR+ features to the same core. Without segment ids both take `fused`
instead: the same sums with the feature map applied chunk by chunk inside scans (and again in
the backward), so no [T, M] feature array is written, or, bidirectional with few enough key
features, the two sums as a few large matmuls in head-major layout with a written-out VJP
(`kernel_sums`). `attend_features` is its twin.
Decoding (`init_cache`, `attend_step`, `step_features`) keeps the recurrent state (S, z) of
Sec. 3.4 per row and advances it with the same chunked prefix sums started from it: O(M H) memory
and work per token, flat in the context.
With impl='pallas' the causal prefix sums run in the Pallas kernels of
`efflong.kernels.linear_attention` (`_prefix` here is their XLA twin).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from efflong import errors, kernels
from efflong.attention import dense
from efflong.kernels import linear_attention
from efflong.mask import Mask

EPS = 1e-6  # The Linear Transformer's denominator epsilon: relu features may see no key mass.


@jax.custom_jvp
def elu1(x: jax.Array) -> jax.Array:
  """elu(x) + 1 = exp(x) below 0, exp(log(1 + x)) = 1 + x above, with the derivative
  min(elu1(x), 1) read from the output.

  The exp last: XLA:CPU then writes the features once, in the layout their matmul reads, and the
  backward reads them; with a select last (x + 1 or exp(x)) it wrote exp(x) as a separate array in
  the input's layout and recomputed the select in every consumer, forward and backward (in the
  layer of issue 19, some 10% slower at T = 16K).
  """
  return jnp.exp(jnp.where(x > 0, jnp.log1p(jnp.maximum(x, 0.0)), x))


@elu1.defjvp
def _elu1_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
              ) -> tuple[jax.Array, jax.Array]:
  y = elu1(primals[0])
  return y, tangents[0] * jnp.minimum(y, 1.0)


FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'elu': elu1,
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


# The fused path (`fused`) --------------------------------------------------------------------
# Causal: features are computed chunk by chunk inside a lax.scan and rematerialised in the
# backward (jax.checkpoint), so no [T, M] feature array is ever written to memory.
# Bidirectional: while the key features are small (S M <= WHOLE_MAX per row and kv head), the sums
# are over the whole sequence, a few large matmuls in head-major layout (`_bidirectional`): their
# [T, M] feature arrays cost less than a scan's many small steps. Beyond, scans of BLOCK tokens.
# In the layer of issue 19 on a 2-core CPU the whole sums were 5-25% faster for linear (M = 64)
# at T = 4K to 64K and for performer (M = 256) at 4K, 6-14% slower for performer at 16K: the
# limit is performer's (linear at 64K, beyond it, would still gain some 10%).

BLOCK = 256  # Tokens per step of the bidirectional scans (any value gives the same sums).
WHOLE_MAX = 2**20  # The largest S M whose bidirectional sums are taken whole.
_NO_SCALE = -1e30  # The running log-scale before any key: exp(_NO_SCALE - s) is 0.

FeatureFn = Callable[[jax.Array], jax.Array]
# The scans' state: S [B, K, M, H + 1] (v with a column of ones: the last is z) and its log-scale
# [B, K] (the largest key log-feature so far; _NO_SCALE without log keys).
State = tuple[jax.Array, jax.Array]


def _chunk_major(x: jax.Array, chunk: int, kv_heads: int | None = None) -> jax.Array:
  """[B, T, N, F] -> [nC, B, N, C, F] (or [nC, B, K, G, C, F] given K), zero-padded to nC C."""
  b, t, n, f = x.shape
  x = jnp.pad(x, ((0, 0), (0, -t % chunk), (0, 0), (0, 0)))
  x = jnp.moveaxis(x.reshape(b, -1, chunk, n, f), (1, 3), (0, 2))
  return x if kv_heads is None else x.reshape(*x.shape[:2], kv_heads, n // kv_heads, chunk, f)


def _token_major(x: jax.Array, length: int) -> jax.Array:
  """[nC, B, K, G, C, F] -> [B, T, K G, F], the first `length` positions (`_chunk_major`'s
  inverse)."""
  nc, b, kh, g, c, f = x.shape
  x = jnp.moveaxis(x.reshape(nc, b, kh * g, c, f), (0, 2), (1, 3))
  return x.reshape(b, nc * c, kh * g, f)[:, :length]


def can_fuse(mask: Mask, impl: str, t: int, s: int, *, log_keys: bool) -> bool:
  """Whether `fused` computes attention under this mask and impl: no segment ids or global
  tokens; causal needs T == S and XLA (impl 'xla', or 'auto' resolving to it; with a running
  key scale 'auto' takes XLA everywhere and 'pallas' is refused, as in `attend_features`).
  Raises errors.Error for an unknown impl."""
  resolved = kernels.resolve(impl)
  if (mask.q_segment_ids is not None or mask.kv_segment_ids is not None
      or mask.global_tokens is not None):
    return False
  if not mask.causal:
    return True
  if t != s or (log_keys and impl == 'pallas'):
    return False
  if log_keys and resolved == 'pallas':
    _warn_scale_in_xla()
  return log_keys or resolved == 'xla'


def _warn_scale_in_xla() -> None:
  logging.log_first_n(logging.WARNING, 'kernel attention: the running key scale (performer, '
                      'causal) runs in XLA, not the Pallas kernel.', 1)


def fused(q: jax.Array, k: jax.Array, v: jax.Array, *, query_features: FeatureFn,
          key_features: FeatureFn, log_keys: bool, causal: bool, chunk: int,
          eps: float) -> jax.Array:
  """Kernel attention without segments: the features computed chunk by chunk in scans, or
  bidirectionally, while S M <= WHOLE_MAX, whole (`_bidirectional`; see above).

  Equal to `attend_features` on the same features (tests/attention/test_linear_fused.py).
  Sums are accumulated with v's extra column of ones (z, the denominator, is that column of S).

  Args:
    q: [B, T, N, H] float32, the query feature map's input.
    k, v: [B, S, K, H] float32; K divides N; S == T when causal.
    query_features: x [..., C, H] -> phi(x) [..., C, M], row by row (a factor common to a row
      cancels in its ratio: the FAVOR+ row max).
    key_features: x [..., C, H] -> phi(x) [..., C, M], or log phi(x) with log_keys.
    log_keys: the keys' features are exp(log phi - s), s the max over the keys a query sees: the
      running max up to the key when causal (`_prefix`'s key_scale: the pair (i, j) weighted
      exp(s_j - s_i)), the max over all keys otherwise (it cancels).
    causal: sums over j <= i (chunks of C: the C x C block masked, the state carried).
    chunk: C when causal (min(C, T)); the bidirectional scans take BLOCK tokens a step.
    eps: added to the denominator, as in `attend_features`.
  Returns:
    [B, T, N, H] float32.
  """
  _check_chunk(chunk)
  t, s = q.shape[1], k.shape[1]
  features = jax.eval_shape(key_features, k[:1, :1]).shape[-1]
  if not causal and s * features <= WHOLE_MAX:
    return _bidirectional(q, k, v, query_features=query_features, key_features=key_features,
                          log_keys=log_keys, eps=eps)
  step = min(chunk, t) if causal else min(BLOCK, s)
  kc = _chunk_major(k, step)
  ones = _chunk_major(jnp.ones(k.shape[:3] + (1,), jnp.float32), step)   # 0 at the padding
  v1 = jnp.concatenate([_chunk_major(v, step), ones], axis=-1)
  state = jnp.zeros(kc.shape[1:3] + (features, v1.shape[-1]), jnp.float32)
  start = (state, jnp.full(kc.shape[1:3], _NO_SCALE, jnp.float32))
  ratio = lambda num1: _ratio(num1[..., :-1], num1[..., -1], eps)
  kh = k.shape[2]
  if causal:
    body = functools.partial(_causal_step, query_features=query_features,
                             key_features=key_features, log_keys=log_keys, ratio=ratio)
    _, out = jax.lax.scan(jax.checkpoint(body), start, (_chunk_major(q, step, kh), kc, v1))
  else:
    key_step = functools.partial(_key_step, key_features=key_features, log_keys=log_keys)
    (state, _), _ = jax.lax.scan(jax.checkpoint(key_step), start, (kc, v1))

    def query_block(x: jax.Array) -> jax.Array:   # x [B, K, G, C, H] -> out [B, K, G, C, H]
      return ratio(jnp.einsum('BKGCM,BKMH->BKGCH', query_features(x), state))

    out = jax.lax.map(jax.checkpoint(query_block), _chunk_major(q, min(BLOCK, t), kh))
  return _token_major(out, t)


def _bidirectional(q: jax.Array, k: jax.Array, v: jax.Array, *, query_features: FeatureFn,
                   key_features: FeatureFn, log_keys: bool, eps: float) -> jax.Array:
  """`fused` without a mask, whole: S = phi(K)^T [V 1] over the sequence, out = phi(Q) S / z.

  In head-major layout (`_head_major`: moving N past T keeps H minor, a cheap copy that XLA fuses
  into the feature maps and the output's division) every product is one batched matmul with a
  single contracting dimension (`kernel_sums`). (Einsums over [B, T, N, H] directly make XLA:CPU
  transpose around the matmuls, 2x their time; contracting G and T together made it transpose
  [T, M] to [M, T], 10x: issue 19.)
  """
  b, t, n, _ = q.shape
  kv = k.shape[2]
  kf = key_features(_head_major(k, kv))
  if log_keys:   # One scale per row and kv head: the largest log-feature (it cancels).
    kf = jnp.exp(kf - jax.lax.stop_gradient(jnp.max(kf, axis=(1, 2), keepdims=True)))
  out = kernel_sums(query_features(_head_major(q, kv)), kf, _head_major(v, kv), eps)
  return out.reshape(b, kv, n // kv, t, -1).transpose(0, 3, 1, 2, 4).reshape(b, t, n, -1)


def _head_major(x: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, N, F] -> [B K, G T, F]: the G query heads of each of the K kv heads, one after the
  other (for keys and values N = K, G = 1)."""
  b, t, n, f = x.shape
  x = x.reshape(b, t, kv_heads, n // kv_heads, f).transpose(0, 2, 3, 1, 4)
  return x.reshape(b * kv_heads, -1, f)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def kernel_sums(qf: jax.Array, kf: jax.Array, v: jax.Array, eps: float) -> jax.Array:
  """Bidirectional kernel attention on head-major features: (qf S_v) / (qf z + eps), S = kf^T v,
  z = the sum of kf (one matmul: kf^T [v 1]); a zero denominator gives zeros.

  Args:
    qf: [X, R, M] query features (X = B K batches of R = G T rows).
    kf: [X, S, M] key features.
    v: [X, S, H].
    eps: added to the denominator.
  Returns:
    [X, R, H] float32.

  The VJP is written out: every cotangent is one batched matmul over the same layouts (S^T's
  through the rows, S's through the keys), and the division's through an einsum (see `divide`).
  """
  return _kernel_sums_fwd(qf, kf, v, eps)[0]


def _kernel_sums_fwd(qf: jax.Array, kf: jax.Array, v: jax.Array, eps: float
                     ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  s = jnp.einsum('XSM,XSH->XMH', kf, v1)
  num1 = jnp.einsum('XRM,XMH->XRH', qf, s)
  den = _denominator(num1[..., -1], eps)
  out = num1[..., :-1] / den[..., None]
  return out, (qf, kf, v1, s, out, den)


def _kernel_sums_bwd(eps: float, res: tuple[jax.Array, ...], g: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  del eps
  qf, kf, v1, s, out, den = res
  # The cotangent of num1 = [num, den]: g / den, and -sum_H(g out) / den.
  g1 = jnp.concatenate([g, -jnp.einsum('XRH,XRH->XR', g, out)[..., None]], -1) / den[..., None]
  gs = jnp.einsum('XRM,XRH->XMH', qf, g1)
  return (jnp.einsum('XRH,XMH->XRM', g1, s), jnp.einsum('XSH,XMH->XSM', v1, gs),
          jnp.einsum('XSM,XMH->XSH', kf, gs[..., :-1]))


kernel_sums.defvjp(_kernel_sums_fwd, _kernel_sums_bwd)


def _key_step(carry: State, x: tuple[jax.Array, jax.Array], *, key_features: FeatureFn,
              log_keys: bool) -> tuple[State, None]:
  """Adds a block of keys k [B, K, C, H] and values [v, 1] to S (bidirectional); with log_keys
  S is kept at the scale of the largest key so far (rescaled as it grows)."""
  s, scale = carry
  k, v1 = x
  kf = key_features(k)
  if not log_keys:
    return (s + jnp.einsum('BKCM,BKCH->BKMH', kf, v1), scale), None
  real = jnp.where(v1[..., -1:] > 0, kf, _NO_SCALE)                 # padding sets no scale
  new = jax.lax.stop_gradient(jnp.maximum(scale, jnp.max(real, axis=(-2, -1))))
  kf = jnp.exp(kf - new[..., None, None])
  return (s * jnp.exp(scale - new)[..., None, None]
          + jnp.einsum('BKCM,BKCH->BKMH', kf, v1), new), None


def _causal_step(carry: State, x: tuple[jax.Array, jax.Array, jax.Array], *,
                 query_features: FeatureFn, key_features: FeatureFn, log_keys: bool,
                 ratio: Callable[[jax.Array], jax.Array]) -> tuple[State, jax.Array]:
  """One chunk of the causal sums: q [B, K, G, C, H], k [B, K, C, H], [v, 1] [B, K, C, H + 1];
  returns the state after the chunk and the chunk's outputs [B, K, G, C, H]."""
  s, scale = carry
  q, k, v1 = x
  c = k.shape[-2]
  qf = query_features(q)
  tri = jnp.tril(jnp.ones((c, c), bool))
  if not log_keys:
    kf = key_features(k)
    a = jnp.where(tri, jnp.einsum('BKGCM,BKDM->BKGCD', qf, kf), 0.0)
    num1 = (jnp.einsum('BKGCD,BKDH->BKGCH', a, v1)
            + jnp.einsum('BKGCM,BKMH->BKGCH', qf, s))
    return (s + jnp.einsum('BKCM,BKCH->BKMH', kf, v1), scale), ratio(num1)
  log = key_features(k)
  # The running max up to each key: the state's scale, then this chunk's keys.
  run = jax.lax.stop_gradient(
      jnp.maximum(scale[..., None], jax.lax.cummax(jnp.max(log, axis=-1), axis=2)))  # [B, K, C]
  last = run[..., -1]
  kf = jnp.exp(log - run[..., None])
  # Pair (i, j <= i) weighted exp(s_j - s_i); queries reach the state (at its scale) by
  # exp(scale - s_i); the state moves to the chunk's last scale. Every factor is <= 1.
  pair = jnp.where(tri, jnp.exp(jnp.minimum(run[..., None, :] - run[..., :, None], 0.0)), 0.0)
  a = jnp.einsum('BKGCM,BKDM->BKGCD', qf, kf) * pair[:, :, None]
  from_state = jnp.exp(scale[..., None] - run)[:, :, None, :, None]
  num1 = (jnp.einsum('BKGCD,BKDH->BKGCH', a, v1)
          + jnp.einsum('BKGCM,BKMH->BKGCH', qf, s) * from_state)
  to_last = kf * jnp.exp(run - last[..., None])[..., None]
  s = s * jnp.exp(scale - last)[..., None, None] + jnp.einsum('BKCM,BKCH->BKMH', to_last, v1)
  return (s, last), ratio(num1)


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
      _warn_scale_in_xla()
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


def _denominator(den: jax.Array, eps: float) -> jax.Array:
  """den + eps, with 1 where that is zero (its numerator is zero there too: the row gets zeros)."""
  den = den + eps
  return jnp.where(den > 0, den, 1.0)


def _ratio(num: jax.Array, den: jax.Array, eps: float) -> jax.Array:
  """num / (den + eps), [..., H] / [...]; zeros where the denominator is zero."""
  return divide(num, _denominator(den, eps))


@jax.custom_vjp
def divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """num [..., H] / den [...], with the denominator's cotangent -sum_H(g out) / den written as
  an einsum: autodiff's sum(g * num / den^2, -1) becomes, on the CPU, a reduction fused with its
  elementwise epilogue that ran some 15x slower than this (issue 19)."""
  return num / den[..., None]


def _divide_fwd(num: jax.Array, den: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  out = num / den[..., None]
  return out, (out, den)


def _divide_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
  out, den = res
  return g / den[..., None], -jnp.einsum('...H,...H->...', g, out) / den


divide.defvjp(_divide_fwd, _divide_bwd)


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
    [B, T, N, H]. Without segment ids (and in XLA when causal) through `fused`, else through
    `attend_features`.
  """
  dense.check_shapes(q, k, v, mask)
  phi = _feature_map(feature_map)
  if can_fuse(mask, impl, q.shape[1], k.shape[1], log_keys=False):
    f32 = lambda x: x.astype(jnp.float32)
    return fused(f32(q), f32(k), f32(v), query_features=phi, key_features=phi, log_keys=False,
                 causal=mask.causal, chunk=chunk, eps=EPS).astype(q.dtype)
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
