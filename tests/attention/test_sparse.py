"""The sparse families against the dense reference under their explicit masks.

Each family must equal `dense.attend_allowed` under the boolean mask written out here, in numpy,
straight from the family's definition (never from its own layout code), ANDed with the ordinary
mask (causal: j <= i; equal segment ids; padding = segment id 0). Values and gradients (of a
random-cotangent weighted sum, w.r.t. q, k, v) agree to a relative error of 1e-5 in float32.

Every case is checked to have an explicit mask that differs from the plain one, so that a family
returning dense attention cannot pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import Mask, bigbird, dense, local, longformer, sparse
from tests.helpers import segments

H = 4  # Head dim throughout.


# Inputs.


def _arrays(*shapes, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def _qkv(b, t, n, kh, seed=0):
  """q [B, T, N, H], k, v [B, T, K, H] and a cotangent dout shaped like q."""
  return _arrays((b, t, n, H), (b, t, kh, H), (b, t, kh, H), (b, t, n, H), seed=seed)


def _mask(causal, seg, global_tokens=None):
  flags = None if global_tokens is None else jnp.asarray(global_tokens)
  return Mask(causal=causal, q_segment_ids=seg, kv_segment_ids=seg, global_tokens=flags)


# Explicit masks, in numpy, from the definitions.


def _offsets(t):
  """i - j for query i (rows) and key j (columns)."""
  i, j = np.meshgrid(np.arange(t), np.arange(t), indexing='ij')
  return i, j, i - j


def plain_mask(causal, seg, b, t):
  """[B, 1, T, T]: causal j <= i, equal segment ids."""
  i, j, _ = _offsets(t)
  ok = np.ones((b, 1, t, t), bool)
  if causal:
    ok &= (j <= i)
  if seg is not None:
    seg = np.asarray(seg)
    ok &= (seg[:, None, :, None] == seg[:, None, None, :])
  return ok


def local_pattern(t, n, window, dilation):
  """[N, T, T]: (i - j) a multiple of d and |i - j| <= window * d (d per head)."""
  _, _, diff = _offsets(t)
  ds = dilation if isinstance(dilation, (tuple, list)) else (dilation,) * n
  return np.stack([(diff % d == 0) & (np.abs(diff) <= window * d) for d in ds])


def strided_pattern(t, n, stride, factorized):
  """[N, T, T]: |i - j| < l or (i - j) mod l == 0 (with j <= i from the causal mask this is the
  causal definition i - j < l); factorized: band on the first half of heads, columns on the rest."""
  _, _, diff = _offsets(t)
  band, column = np.abs(diff) < stride, diff % stride == 0
  if not factorized:
    return np.broadcast_to(band | column, (n, t, t))
  return np.stack([band] * (n // 2) + [column] * (n - n // 2))


def fixed_pattern(t, n, block, summary, factorized):
  """[N, T, T]: floor(j / l) == floor(i / l) or j mod l >= l - c; factorized: own block on the
  first half of heads, summary positions on the rest."""
  i, j, _ = _offsets(t)
  own, summ = (i // block == j // block), (j % block >= block - summary)
  if not factorized:
    return np.broadcast_to(own | summ, (n, t, t))
  return np.stack([own] * (n // 2) + [summ] * (n - n // 2))


def global_flags(b, t, count=None, flags=None):
  """[B, T] bool: the given per-example flags, or the first `count` positions."""
  if flags is not None:
    return np.asarray(flags, bool)
  return np.broadcast_to(np.arange(t) < count, (b, t))


def with_globals(pattern, flags):
  """[B, N, T, T]: pattern, or i global, or j global."""
  g = flags[:, None, :, None] | flags[:, None, None, :]
  return pattern[None] | g


def bigbird_pattern(t, n, *, block, window, random_blocks, causal, seed):
  """[N, T, T]: |i//C - j//C| <= w, or j//C one of the random blocks of (head, i//C).

  The random blocks are read from `bigbird.random_layout` (its used slots minus the window, which
  is written out here); they are checked to be r blocks outside the window (causal: earlier).
  """
  nb = -(-t // block)
  layout = bigbird.random_layout(t, heads=n, block=block, window=window,
                                 random_blocks=random_blocks, causal=causal, seed=seed)
  used = np.zeros((n, nb, nb), bool)
  for h, qb, v in zip(*np.nonzero(layout.kind != 0)):
    used[h, qb, layout.kv_blocks[h, qb, v]] = True
  qb, kb = np.meshgrid(np.arange(nb), np.arange(nb), indexing='ij')
  near = np.abs(qb - kb) <= window
  rand = used & ~near
  far = ~near & ((kb < qb) if causal else True)
  assert not np.any(rand & ~far), 'a random block inside the window or in the future'
  np.testing.assert_array_equal(rand.sum(-1),
                                np.broadcast_to(np.minimum(random_blocks, far.sum(-1)), (n, nb)))
  blocks = near[None] | rand                                   # [N, nb, nb]
  pos = np.arange(t) // block
  return blocks[:, pos[:, None], pos[None, :]]


# The comparison.


@functools.partial(jax.jit, static_argnums=0)
def _family(fn, args, dout):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(dout)


@jax.jit
def _reference(q, k, v, allowed, dout):
  fn = lambda q, k, v: dense.attend_allowed(q, k, v, allowed, q.shape[-1] ** -0.5)[0]
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(dout)


def _close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err, top = np.abs(got - want).max(), np.abs(want).max()
  assert err <= 1e-5 * top + 1e-7, f'{what}: max error {err:.3g} (max |reference| {top:.3g})'


def check(fn, q, k, v, dout, allowed, causal, seg):
  """fn(q, k, v) equals the dense reference under allowed [B|1, N|1, T, T] (ANDed with the plain
  mask), values and gradients; the explicit mask must restrict the plain one somewhere."""
  b, t, n, _ = q.shape
  plain = plain_mask(causal, seg, b, t)
  full = np.broadcast_to(np.asarray(allowed, bool) & plain, (b, n, t, t))
  assert np.any(full != np.broadcast_to(plain, full.shape)), 'the explicit mask restricts nothing'
  out, grads = _family(fn, (q, k, v), dout)
  want, want_grads = _reference(q, k, v, jnp.asarray(full), dout)
  assert out.dtype == jnp.float32
  _close(out, want, 'out')
  for got, exp, name in zip(grads, want_grads, 'qkv'):
    _close(got, exp, f'd{name}')


# local.

LOCAL = {
    # name: (B, T, N, K, causal, segments, window, dilation, block)
    'causal_packed_T%block': (2, 13, 2, 2, True, 'packed', 2, 1, 4),
    'causal_padded_dilated_gqa': (2, 16, 4, 2, True, 'pad', 3, 2, 4),
    'bidirectional_packed_per_head_dilation_mqa': (2, 14, 4, 1, False, 'packed', 2, (1, 2, 3, 1),
                                                   4),
}


@pytest.mark.parametrize('name', list(LOCAL))
def test_local_matches_dense_under_its_mask(name):
  b, t, n, kh, causal, segs, window, dilation, block = LOCAL[name]
  q, k, v, dout = _qkv(b, t, n, kh)
  seg = segments(segs, b, t)
  mask = _mask(causal, seg)
  fn = lambda q, k, v: local.attend(q, k, v, mask=mask, window=window, dilation=dilation,
                                    block=block)
  check(fn, q, k, v, dout, local_pattern(t, n, window, dilation)[None], causal, seg)


@pytest.mark.parametrize('causal,window', [(True, 9), (False, 25)])
def test_local_with_window_at_least_T_minus_1_is_dense(causal, window):
  b, t, n, kh = 2, 10, 4, 2
  q, k, v, _ = _qkv(b, t, n, kh, seed=1)
  mask = _mask(causal, segments('packed', b, t))
  want = jax.jit(functools.partial(dense.attend, mask=mask))(q, k, v)
  got = jax.jit(functools.partial(local.attend, mask=mask, window=window, block=4))(q, k, v)
  _close(got, want, f'window={window}')


def test_the_explicit_mask_matters():
  """A narrow window really differs from dense attention, and from the reference without its
  pattern: the comparisons above cannot pass by computing dense attention."""
  b, t, n, kh = 2, 12, 2, 2
  q, k, v, dout = _qkv(b, t, n, kh, seed=2)
  mask = _mask(True, None)
  got = np.asarray(jax.jit(functools.partial(local.attend, mask=mask, window=2, block=4))(q, k, v))
  plain = plain_mask(True, None, b, t)
  want_plain, _ = _reference(q, k, v, jnp.asarray(np.broadcast_to(plain, (b, n, t, t))), dout)
  assert np.abs(got - np.asarray(want_plain)).max() > 1e-2
  # The first rows (i <= window) see their whole past either way.
  np.testing.assert_allclose(got[:, :3], np.asarray(want_plain)[:, :3], atol=1e-6)


# strided and fixed.

STRIDED = {
    # name: (B, T, N, K, causal, segments, stride, factorized, block)
    'causal_padded_T%block': (2, 13, 2, 2, True, 'pad', 3, False, 4),
    'bidirectional_packed_gqa_default_block': (2, 16, 4, 2, False, 'packed', 4, False, None),
    'factorized_causal_packed_gqa': (2, 11, 4, 2, True, 'packed', 3, True, 4),
}


@pytest.mark.parametrize('name', list(STRIDED))
def test_strided_matches_dense_under_its_mask(name):
  b, t, n, kh, causal, segs, stride, factorized, block = STRIDED[name]
  q, k, v, dout = _qkv(b, t, n, kh)
  seg = segments(segs, b, t)
  mask = _mask(causal, seg)
  fn = lambda q, k, v: sparse.strided(q, k, v, mask=mask, stride=stride, factorized=factorized,
                                      block=block)
  check(fn, q, k, v, dout, strided_pattern(t, n, stride, factorized)[None], causal, seg)


FIXED = {
    # name: (B, T, N, K, causal, segments, block, summary, factorized)
    'causal_packed_T%block': (2, 13, 2, 2, True, 'packed', 4, 1, False),
    'bidirectional_padded_gqa': (2, 16, 4, 2, False, 'pad', 3, 2, False),
    'factorized_bidirectional_packed_mqa': (2, 12, 4, 1, False, 'packed', 5, 2, True),
}


@pytest.mark.parametrize('name', list(FIXED))
def test_fixed_matches_dense_under_its_mask(name):
  b, t, n, kh, causal, segs, block, summary, factorized = FIXED[name]
  q, k, v, dout = _qkv(b, t, n, kh)
  seg = segments(segs, b, t)
  mask = _mask(causal, seg)
  fn = lambda q, k, v: sparse.fixed(q, k, v, mask=mask, block=block, summary=summary,
                                    factorized=factorized)
  check(fn, q, k, v, dout, fixed_pattern(t, n, block, summary, factorized)[None], causal, seg)


# longformer.

FLAGS_13 = np.zeros((2, 13), bool)
FLAGS_13[0, [0, 6]] = True   # Two per-example globals in row 0 (one in each packed segment) ...
FLAGS_13[1, 7] = True        # ... one in row 1 (before its padding, which starts at 9).

LONGFORMER = {
    # name: (B, T, N, K, causal, segments, window, dilation, global_tokens, flags)
    'causal_packed_first_2_gqa': (2, 13, 4, 2, True, 'packed', 2, 1, 2, None),
    'bidirectional_padded_per_head_dilation_mqa': (2, 14, 2, 1, False, 'pad', 1, (1, 2), 1, None),
    'causal_padded_mask_flags_gqa': (2, 13, 4, 2, True, 'pad', 2, (1, 1, 2, 2), 2, FLAGS_13),
}


@pytest.mark.parametrize('name', list(LONGFORMER))
def test_longformer_matches_dense_under_its_mask(name):
  b, t, n, kh, causal, segs, window, dilation, count, flags = LONGFORMER[name]
  q, k, v, dout = _qkv(b, t, n, kh)
  seg = segments(segs, b, t)
  mask = _mask(causal, seg, flags)
  fn = lambda q, k, v: longformer.attend(q, k, v, mask=mask, window=window, dilation=dilation,
                                         global_tokens=count, separate_global=False, block=4)
  pattern = with_globals(local_pattern(t, n, window, dilation), global_flags(b, t, count, flags))
  check(fn, q, k, v, dout, pattern, causal, seg)


@jax.jit
def _reference_separate(q, k, v, qg, kg, vg, allowed, rows, dout):
  """Global rows (rows [B, T]) attend with (qg, kg, vg); the others with (q, k, v)."""
  def fn(q, k, v, qg, kg, vg):
    scale = q.shape[-1] ** -0.5
    plain = dense.attend_allowed(q, k, v, allowed, scale)[0]
    glob = dense.attend_allowed(qg, kg, vg, allowed, scale)[0]
    return jnp.where(rows[:, :, None, None], glob, plain)
  out, vjp = jax.vjp(fn, q, k, v, qg, kg, vg)
  return out, vjp(dout)


def test_longformer_separate_global_projections():
  """Global rows are the dense rows of (q_g, k_g, v_g) under the same mask; the other rows are
  those of (q, k, v) and never read q_g, k_g, v_g."""
  b, t, n, kh, window, dilation = 2, 13, 4, 2, 1, 2
  causal, segs, count, flags = False, 'packed', 2, FLAGS_13
  q, k, v, dout = _qkv(b, t, n, kh)
  qg, kg, vg = _arrays(q.shape, k.shape, v.shape, seed=5)
  seg = segments(segs, b, t)
  mask = _mask(causal, seg, flags)
  attend = lambda q, k, v, qg, kg, vg: longformer.attend(
      q, k, v, mask=mask, window=window, dilation=dilation, global_tokens=count,
      global_qkv=(qg, kg, vg), block=4)
  rows = global_flags(b, t, count, flags)
  plain = plain_mask(causal, seg, b, t)
  allowed = np.broadcast_to(with_globals(local_pattern(t, n, window, dilation), rows) & plain,
                            (b, n, t, t))
  assert np.any(allowed != np.broadcast_to(plain, allowed.shape))
  attend = jax.jit(attend)
  out, grads = _family(attend, (q, k, v, qg, kg, vg), dout)
  want, want_grads = _reference_separate(q, k, v, qg, kg, vg, jnp.asarray(allowed),
                                         jnp.asarray(rows), dout)
  _close(out, want, 'out')
  for got, exp, name in zip(grads, want_grads, ('q', 'k', 'v', 'q_g', 'k_g', 'v_g')):
    _close(got, exp, f'd{name}')
  # Other global projections: global rows move, the other rows are exactly unchanged.
  out = np.asarray(attend(q, k, v, qg, kg, vg))
  other = np.asarray(attend(q, k, v, *_arrays(q.shape, k.shape, v.shape, seed=6)))
  np.testing.assert_array_equal(other[~rows], out[~rows])
  assert np.abs(other[rows] - out[rows]).max(-1).min() > 1e-3


# bigbird.

BIGBIRD = {
    # name: (B, T, N, K, causal, segments, block, window, random_blocks, global_tokens, flags, seed)
    'causal_padded_T%block_no_globals': (2, 14, 2, 2, True, 'pad', 4, 1, 1, 0, None, 0),
    'bidirectional_packed_first_2_gqa': (2, 22, 4, 2, False, 'packed', 4, 1, 1, 2, None, 1),
    'causal_packed_mask_flags_mqa': (2, 13, 4, 1, True, 'packed', 3, 1, 1, 2, FLAGS_13, 2),
}


@pytest.mark.parametrize('name', list(BIGBIRD))
def test_bigbird_matches_dense_under_its_mask(name):
  b, t, n, kh, causal, segs, block, window, r, count, flags, seed = BIGBIRD[name]
  q, k, v, dout = _qkv(b, t, n, kh)
  seg = segments(segs, b, t)
  mask = _mask(causal, seg, flags)
  fn = lambda q, k, v: bigbird.attend(q, k, v, mask=mask, window=window, global_tokens=count,
                                      random_blocks=r, block=block, seed=seed)
  pattern = bigbird_pattern(t, n, block=block, window=window, random_blocks=r, causal=causal,
                            seed=seed)
  check(fn, q, k, v, dout, with_globals(pattern, global_flags(b, t, count, flags)), causal, seg)
