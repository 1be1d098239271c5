"""Transformer-XL relative attention against a naive evaluation with gathered encodings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import Mask, dense, relative
from efflong.sinusoids import sinusoidal
from tests.attention import arrays, close, vjp

B, N, H, E = 2, 4, 8, 12


def naive(q, k, v, pos_proj, content_bias, pos_bias, mask):
  """Every (i, j) score from its own gathered encoding r_{(S - T + i) - j}: [T, S, N, H]."""
  t, s = q.shape[1], k.shape[1]
  dist = (s - t + jnp.arange(t))[:, None] - jnp.arange(s)[None, :]  # [T, S]
  r = jnp.einsum('TSE,ENH->TSNH', sinusoidal(dist, E), pos_proj)
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  scores = (jnp.einsum('BTNH,BSNH->BNTS', q + content_bias, k)
            + jnp.einsum('BTNH,TSNH->BNTS', q + pos_bias, r)) * H ** -0.5
  allowed = mask.materialize(t, s)[:, None]
  probs = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1) * allowed.any(-1,
                                                                                   keepdims=True)
  return jnp.einsum('BNTS,BSNH->BTNH', probs, v)


def test_rel_shift_is_the_per_row_gather():
  t, s = 5, 9
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, t, s + t - 1)))
  dist = relative.distances(t, s)
  want = np.zeros((3, t, s))
  for i in range(t):
    for j in range(s):
      want[:, i, j] = x[:, i, int(np.flatnonzero(dist == s - t + i - j)[0])]
  np.testing.assert_array_equal(relative.rel_shift(x, s), want)


@pytest.mark.parametrize('t,s,causal,kv_heads,padded', [
    (7, 7, True, N, False),     # plain causal segment
    (6, 10, True, N, False),    # 4 memory positions before the segment
    (6, 10, True, 2, True),     # grouped kv heads, padded memory
    (7, 7, False, N, True),     # bidirectional, padded
])
def test_equals_naive_values_and_grads(t, s, causal, kv_heads, padded):
  q, k, v, out_cot = arrays((B, t, N, H), (B, s, kv_heads, H), (B, s, kv_heads, H), (B, t, N, H))
  pos_proj, u, w = arrays((E, N, H), (N, H), (N, H), seed=1)
  kv_seg = jnp.ones((B, s), jnp.int32)
  if padded:  # row 0: its first 3 keys (memory not yet filled) are padding
    kv_seg = kv_seg.at[0, :3].set(0)
  mask = Mask(causal=causal, q_segment_ids=jnp.ones((B, t), jnp.int32), kv_segment_ids=kv_seg)
  fast = lambda *a: relative.attend(*a[:3], mask=mask, pos_proj=a[3], content_bias=a[4],
                                    pos_bias=a[5])
  slow = lambda *a: naive(*a, mask)
  args = (q, k, v, pos_proj, u, w)
  got, got_grads = vjp(fast, args, out_cot)
  want, want_grads = vjp(slow, args, out_cot)
  close(got, want, 'values')
  for name, g, w_ in zip('q k v pos_proj content_bias pos_bias'.split(), got_grads, want_grads):
    close(g, w_, f'd{name}')


def test_distance_term_moves_the_output():
  """W_R = 0 and u = 0 is content-only attention; a nonzero W_R changes it (the term is used)."""
  q, k, v = arrays((B, 5, N, H), (B, 5, N, H), (B, 5, N, H))
  zeros = jnp.zeros((N, H))
  mask = Mask(causal=True)
  plain = relative.attend(q, k, v, mask=mask, pos_proj=jnp.zeros((E, N, H)), content_bias=zeros,
                          pos_bias=zeros)
  close(plain, dense.attend(q, k, v, mask=mask), 'W_R = 0 is dense')
  moved = relative.attend(q, k, v, mask=mask, pos_proj=arrays((E, N, H))[0], content_bias=zeros,
                          pos_bias=zeros)
  assert np.abs(np.asarray(moved - plain)).max() > 1e-2
