"""dense.attend, the reference every family is tested against, against a per-query loop.

The loop (`naive`) is float64 numpy: for each batch row, head and query it lists the keys the query
may see, takes a softmax over them, and averages their values; its gradient is the textbook softmax
backward, itself checked against finite differences below.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import Mask, dense


def naive(q, k, v, q_seg, kv_seg, *, causal, scale=None, dout=None):
  """Output and (dq, dk, dv) of sum(out * dout), one query at a time.

  A query t of T sees key s of S when the segment ids match (if given) and, causal, s <= t + S - T
  (queries aligned to the end of the keys). Query head n reads kv head n // (N // K).
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b_, t_, n_, h_ = q.shape
  s_, k_ = k.shape[1], k.shape[2]
  scale = h_ ** -0.5 if scale is None else scale
  out, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  for b in range(b_):
    for t in range(t_):
      for n in range(n_):
        h = n // (n_ // k_)
        keys = [s for s in range(s_)
                if (q_seg is None or q_seg[b][t] == kv_seg[b][s])
                and (not causal or s <= t + s_ - t_)]
        if not keys:
          continue  # Sees nothing: zeros, and no gradient.
        logits = np.array([scale * q[b, t, n] @ k[b, s, h] for s in keys])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, t, n] = sum(pi * v[b, s, h] for pi, s in zip(p, keys))
        if dout is not None:
          g = np.asarray(dout, np.float64)[b, t, n]
          dp = np.array([g @ v[b, s, h] for s in keys])
          dlogits = p * (dp - p @ dp)
          for pi, dl, s in zip(p, dlogits, keys):
            dv[b, s, h] += pi * g
            dq[b, t, n] += scale * dl * k[b, s, h]
            dk[b, s, h] += scale * dl * q[b, t, n]
  return out, (dq, dk, dv)


def _qkv(b, t, s, n, kh, h, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(b, t, n, h), (b, s, kh, h), (b, s, kh, h), (b, t, n, h)]
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


def _mask(causal, q_seg, kv_seg):
  as_ids = lambda ids: None if ids is None else jnp.asarray(ids, jnp.int32)
  return Mask(causal=causal, q_segment_ids=as_ids(q_seg), kv_segment_ids=as_ids(kv_seg))


_attend = jax.jit(dense.attend, static_argnames='scale')


@functools.partial(jax.jit, static_argnames='scale')
def _value_and_grads(q, k, v, mask, dout, scale=None):
  """Output and gradients of sum(out * dout) w.r.t. q, k, v (jitted: one compile per shape)."""
  attend = lambda q, k, v: dense.attend(q, k, v, mask=mask, scale=scale)
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(dout)


PACKED = [[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]  # packing and padding
LEFT_PADDED = [[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1]]  # pads in every query's past
KV_8 = [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 2, 2, 2, 2]]

CASES = {
    # name: (B, T, S, N, K, H, causal, q_segment_ids, kv_segment_ids, scale)
    'causal': (2, 8, 8, 2, 2, 4, True, None, None, None),
    'bidirectional': (2, 8, 8, 2, 2, 4, False, None, None, None),
    'causal_packed': (2, 8, 8, 2, 2, 4, True, PACKED, PACKED, None),
    'bidirectional_packed': (2, 8, 8, 2, 2, 4, False, PACKED, PACKED, None),
    'causal_left_padded': (2, 8, 8, 2, 2, 4, True, LEFT_PADDED, LEFT_PADDED, None),
    # T < S causal: query t sits at key S - T + t (decoding after S - T cached keys).
    'causal_T<S': (2, 5, 8, 2, 2, 4, True, None, None, None),
    'causal_T<S_packed': (2, 5, 8, 2, 2, 4, True, [r[3:] for r in KV_8], KV_8, None),
    'bidirectional_T>S_packed': (2, 8, 5, 2, 2, 4, False, PACKED, [r[:5] for r in KV_8], None),
    'gqa_K=1': (2, 8, 8, 4, 1, 4, True, PACKED, PACKED, None),
    'gqa_K=2': (2, 6, 8, 4, 2, 4, True, [r[2:] for r in KV_8], KV_8, None),
    'gqa_K=2_bidirectional': (2, 8, 8, 4, 2, 4, False, PACKED, PACKED, None),
    'scale': (2, 8, 8, 2, 1, 4, True, PACKED, PACKED, 0.3),
}


@pytest.mark.parametrize('name', list(CASES))
def test_matches_naive_loop_values_and_grads(name):
  b, t, s, n, kh, h, causal, q_seg, kv_seg, scale = CASES[name]
  q, k, v, dout = _qkv(b, t, s, n, kh, h)
  out, grads = _value_and_grads(q, k, v, _mask(causal, q_seg, kv_seg), dout, scale)
  want, want_grads = naive(q, k, v, q_seg, kv_seg, causal=causal, scale=scale, dout=dout)
  assert out.shape == (b, t, n, h) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  for got, exp, what in zip(grads, want_grads, 'qkv'):
    np.testing.assert_allclose(got, exp, atol=1e-5, rtol=1e-5, err_msg=f'd{what}')


def test_naive_gradient_matches_finite_differences():
  """The reference backward is itself checked, in float64, on a tiny case with every feature."""
  q, k, v, dout = (np.asarray(a, np.float64) for a in _qkv(1, 3, 4, 2, 1, 2, seed=1))
  q_seg, kv_seg = [[1, 2, 2]], [[1, 1, 2, 2]]
  loss = lambda q, k, v: np.sum(naive(q, k, v, q_seg, kv_seg, causal=True)[0] * dout)
  _, grads = naive(q, k, v, q_seg, kv_seg, causal=True, dout=dout)
  args, eps = [q, k, v], 1e-6
  for i, grad in enumerate(grads):
    fd = np.zeros_like(args[i])
    for idx in np.ndindex(args[i].shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[i][idx] += eps
      minus[i][idx] -= eps
      fd[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-6)
    assert np.abs(grad).max() > 1e-3  # Not vacuous.


def test_queries_that_see_nothing_give_zeros_and_finite_grads():
  # Query segment 3 has no keys; batch row 1's queries 0-1 are pads facing no pad keys.
  q_seg = [[1, 3, 3, 2], [0, 0, 1, 1]]
  kv_seg = [[1, 1, 2, 2, 2, 1], [1, 1, 1, 1, 1, 1]]
  q, k, v, dout = _qkv(2, 4, 6, 2, 2, 4)
  blind = np.array(q_seg) == np.array([[3, 3, 3, 3], [0, 0, 0, 0]])
  for causal in (False, True):
    mask = _mask(causal, q_seg, kv_seg)
    out, (dq, dk, dv) = _value_and_grads(q, k, v, mask, dout)
    want, want_grads = naive(q, k, v, q_seg, kv_seg, causal=causal, dout=dout)
    np.testing.assert_array_equal(np.asarray(out)[blind], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[blind], 0.0)
    for got in (out, dq, dk, dv):
      assert np.all(np.isfinite(got))
    np.testing.assert_allclose(out, want, atol=1e-5)
    for got, exp in zip((dq, dk, dv), want_grads):
      np.testing.assert_allclose(got, exp, atol=1e-5)


def test_causal_queries_align_to_the_end_of_keys():
  """The last T' queries over all S keys equal the last T' rows of full causal attention."""
  q, k, v, _ = _qkv(2, 8, 8, 4, 2, 4)
  full = _attend(q, k, v, mask=Mask(causal=True))
  for tail in (1, 3):
    part = _attend(q[:, -tail:], k, v, mask=Mask(causal=True))
    np.testing.assert_allclose(part, full[:, -tail:], atol=1e-6)
  # One query at the end sees every key: causal and bidirectional agree.
  np.testing.assert_allclose(_attend(q[:, -1:], k, v, mask=Mask(causal=True)),
                             _attend(q[:, -1:], k, v, mask=Mask(causal=False)), atol=1e-6)


def test_bfloat16_inputs():
  q, k, v, _ = _qkv(2, 8, 8, 2, 1, 4)
  mask = _mask(True, PACKED, PACKED)
  out = _attend(*(a.astype(jnp.bfloat16) for a in (q, k, v)), mask=mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), _attend(q, k, v, mask=mask), atol=5e-2)


def _raises(match, q_shape=(2, 8, 4, 4), kv_shape=(2, 8, 2, 4), v_shape=None, **mask):
  q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  v = jnp.zeros(v_shape or kv_shape)
  with pytest.raises(ValueError, match=match):
    dense.attend(q, k, v, mask=Mask(**mask))


def test_shape_errors_are_value_errors_naming_the_problem():
  _raises(r'K=3 must divide query heads N=4', kv_shape=(2, 8, 3, 4))
  _raises(r'k and v must be', v_shape=(2, 7, 2, 4))
  _raises(r'k and v must be', kv_shape=(2, 8, 2, 5))
  _raises(r'ranks 3, 4, 4', q_shape=(2, 8, 16))
  ids = lambda *shape: jnp.ones(shape, jnp.int32)
  _raises(r'q_segment_ids has shape \(2, 7\); expected \(2, 8\)',
          q_segment_ids=ids(2, 7), kv_segment_ids=ids(2, 8))
  _raises(r'kv_segment_ids has shape \(1, 8\); expected \(2, 8\)',
          q_segment_ids=ids(2, 8), kv_segment_ids=ids(1, 8))
  _raises(r'both q_segment_ids and kv_segment_ids', q_segment_ids=ids(2, 8))
  _raises(r'both q_segment_ids and kv_segment_ids', kv_segment_ids=ids(2, 8))
  _raises(r'causal mask needs T <= S; got T=8, S=5', kv_shape=(2, 5, 2, 4), causal=True)
