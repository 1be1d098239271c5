"""Cached decoding of kernel attention (linear, performer): prefill, then one token at a time,
equals the causal parallel `attend` over each row's whole sequence at every real position.

`replay` (shared with the other decoding tests) feeds each row's positions call by call, right-
padding every call with loud noise that must not reach any output or the cache.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from efflong.attention import Mask, linear, performer
import tests.attention as attention_tests
from tests.attention import arrays, close

B, N, KH, H = 2, 4, 2, 8
# Row 0: a 5-token prompt; row 1: 3 tokens (2 of padding); then single tokens, row 1 idle once.
SCHEDULE = [(5, 3)] + [(1, 1)] * 4 + [(1, 0)] + [(1, 1)] * 3
LENGTHS = np.sum(SCHEDULE, axis=0)   # Real positions per row: 13 and 10.


def replay(step, cache, q, k, v, schedule=SCHEDULE, **inputs):
  """tests.attention.replay of step(q, k, v, cache, mask=, **inputs) (an attend_step) over the
  rows' sequences q [B, L, N, H], k, v [B, L, K, H]."""
  call = lambda q, k, v, cache, seg: step(q, k, v, cache, mask=Mask.from_segments(seg, causal=True),
                                          **inputs)
  return attention_tests.replay(call, cache, (q, k, v), schedule)


def check_rows(got, want, what, lengths=LENGTHS, rtol=1e-5):
  """got equals want at each row's real positions."""
  for row, n in enumerate(lengths):
    close(got[row, :n], np.asarray(want)[row, :n], f'{what}, row {row}', rtol)


def sequences(seed, length=max(LENGTHS), heads=N, kv_heads=KH):
  """q [B, L, N, H], k, v [B, L, K, H] and the causal mask of the rows' real positions."""
  q, k, v = arrays((B, length, heads, H), (B, length, kv_heads, H), (B, length, kv_heads, H),
                   seed=seed)
  seg = (np.arange(length)[None] < LENGTHS[:, None]).astype(np.int32)
  return q, k, v, Mask.from_segments(jnp.asarray(seg), causal=True)


def test_linear_decoding_equals_the_causal_form_across_chunks():
  q, k, v, mask = sequences(0)
  want = linear.attend(q, k, v, mask=mask, chunk=3)
  step = jax.jit(functools.partial(linear.attend_step, chunk=2))
  got, cache = replay(step, linear.init_cache(B, 64, num_kv_heads=KH, head_dim=H,
                                              dtype=jnp.float32), q, k, v)
  check_rows(got, want, 'linear elu')
  assert {x: y.shape for x, y in cache.items()} == {
      x: y.shape for x, y in linear.init_cache(B, 1 << 20, num_kv_heads=KH, head_dim=H,
                                               dtype=jnp.float32).items()}


def test_performer_decoding_equals_the_causal_form():
  """Softmax features: the cached running log-scale continues the parallel form's running max
  exactly (keys spread in norm, so the max moves); relu features: no scale."""
  q, k, v, mask = sequences(1)
  k = k * jnp.linspace(0.2, 3.0, k.shape[1])[None, :, None, None]
  w = performer.draw(jax.random.key(0), 16, H, orthogonal=True)
  for kernel in performer.KERNELS:
    want = performer.attend(q, k, v, mask=mask, projection=w, kernel=kernel, chunk=4)
    step = jax.jit(functools.partial(performer.attend_step, kernel=kernel, chunk=3))
    init = lambda max_len: performer.init_cache(B, max_len, num_kv_heads=KH, head_dim=H,
                                                dtype=jnp.float32, kernel=kernel, nb_features=16)
    got, cache = replay(step, init(32), q, k, v, projection=w)
    check_rows(got, want, kernel)
    assert ('scale' in cache) == (kernel == 'softmax')
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, init(1 << 20))
