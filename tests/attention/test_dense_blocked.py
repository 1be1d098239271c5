"""dense.blocked (the online softmax over key blocks) against the explicit T x S computation.

Tiny shapes with a tiny block (8) so that several query and key blocks run: every case compares
the output, the log-sum-exp and the gradients w.r.t. q, k, v (through both outputs) at 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import errors
from efflong.attention import Mask, dense
from efflong.mask import NEG_INF
from tests.attention import arrays, close, vjp
from tests.helpers import segments

BLOCK = 8
# Key segments: runs of 12, 20, 5 (then 3 pads) and 16, 16, 8 over 40 positions, the queries'
# those of the last T keys: with blocks of 8, some block pairs lie inside one segment in both rows
# (no mask), some meet in neither (skipped), others mask.
RUNS = ((12, 20, 5), (16, 16, 8))

CASES = {
    # name: (T, S, N, K, causal, segment ids: None, 'runs' (RUNS) or 'blind', scale)
    # Queries aligned to the end of the keys; T does not divide by the block.
    'causal_T<S_gqa_packed': (35, 40, 4, 2, True, 'runs', 0.3),
    'bidirectional': (40, 40, 2, 2, False, None, None),
    # Query segment 9 meets no key (zeros, NEG_INF, no gradient); neither length divides.
    'bidirectional_T>S_mqa_blind': (37, 21, 4, 1, False, 'blind', None),
}


def _segments(kind, t, s):
  if kind is None:
    return None, None
  if kind == 'runs':
    seg = segments('runs', 2, s, runs=RUNS)
    return seg[:, s - t:], seg
  q_seg = np.ones((2, t), np.int32)
  q_seg[0, 3:9] = 9
  k_seg = np.ones((2, s), np.int32)
  k_seg[1, s // 2:] = 0
  return jnp.asarray(q_seg), jnp.asarray(k_seg)


@pytest.mark.parametrize('name', list(CASES))
def test_blocked_matches_explicit(name):
  t, s, n, kh, causal, kind, scale = CASES[name]
  h = 8
  q, k, v, dout, dlse = arrays((2, t, n, h), (2, s, kh, h), (2, s, kh, h), (2, t, n, h), (2, t, n))
  q_seg, k_seg = _segments(kind, t, s)
  mask = Mask(causal=causal, q_segment_ids=q_seg, kv_segment_ids=k_seg)
  scale = h ** -0.5 if scale is None else scale

  def blocked(q, k, v):
    return dense.blocked(q, k, v, q_pos=jnp.arange(t)[None] + s - t, q_seg=q_seg, k_seg=k_seg,
                         causal=causal, scale=scale, block=BLOCK)

  def explicit(q, k, v):
    return dense.attend_allowed(q, k, v, mask.materialize(t, s)[:, None], scale)

  (out, lse), grads = vjp(blocked, (q, k, v), (dout, dlse))
  (want, want_lse), want_grads = vjp(explicit, (q, k, v), (dout, dlse))
  close(out, want, 'out')
  blind = np.asarray(want_lse) == NEG_INF
  np.testing.assert_array_equal(np.asarray(lse) == NEG_INF, blind)
  close(np.where(blind, 0, lse), np.where(blind, 0, want_lse), 'lse')
  for got, exp, what in zip(grads, want_grads, 'qkv'):
    assert np.isfinite(got).all()
    close(got, exp, f'd{what}')
  if kind == 'blind':
    assert blind.any()
    np.testing.assert_array_equal(np.asarray(out)[blind], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0])[blind], 0.0)


def test_attend_and_attend_step_take_the_blocked_path_past_one_block():
  """attend and a decoding step over a cache longer than dense.BLOCK (the blocked path, default
  block) against the explicit reference; rows of different lengths, grouped-query heads."""
  t, n, kh, h = dense.BLOCK + 9, 2, 1, 4
  q, k, v, dout = arrays((2, t, n, h), (2, t, kh, h), (2, t, kh, h), (2, t, n, h), seed=1)
  loops = lambda fn, *args: 'while[' in str(jax.make_jaxpr(fn)(*args))  # The blocked path's.
  assert loops(functools.partial(dense.attend, mask=Mask(causal=True)), q, k, v)
  assert not loops(functools.partial(dense.attend, mask=Mask(causal=True)), q[:, :9], k[:, :9],
                   v[:, :9])

  @jax.jit
  def values_and_grads(q, k, v, seg):  # The mask traced: nothing T x S to constant-fold.
    mask = Mask.from_segments(seg, causal=True)
    pairs = [jax.vjp(functools.partial(attend, mask=mask), q, k, v)
             for attend in (dense.attend, dense.reference)]
    return [(out, pullback(dout)) for out, pullback in pairs]

  (out, grads), (want, want_grads) = values_and_grads(q, k, v, segments('pad', 2, t))
  close(out, want, 'out')
  for got, exp, what in zip(grads, want_grads, 'qkv'):
    close(got, exp, f'd{what}')

  # A decoding call of 6 / 4 real positions (one query block, shorter than the block) into a
  # cache of S_max = t slots: causal, so it gives the first rows of `want`.
  cache = dense.init_cache(2, t, num_kv_heads=kh, head_dim=h, dtype=jnp.float32)
  lengths = np.array([6, 4])
  real = jnp.asarray(np.arange(6)[None] < lengths[:, None], jnp.int32)
  step = functools.partial(dense.attend_step, mask=Mask.from_segments(real, causal=True))
  assert loops(step, q[:, :6], k[:, :6], v[:, :6], cache)
  got, cache = jax.jit(step)(q[:, :6], k[:, :6], v[:, :6], cache)
  np.testing.assert_array_equal(cache['length'], lengths)
  for row, length in enumerate(lengths):
    close(got[row, :length], want[row, :length], f'prefill row {row}')


def test_compiled_memory_holds_no_t_by_s_array():
  """The compiled forward + backward of the blocked path holds no T x S array: its temporary
  memory is under a quarter of one head's T x T float32 scores, which a quadratic path holds (the
  explicit one holds several per head)."""
  t, n, h = 2048, 2, 8
  q, k, v = arrays((1, t, n, h), (1, t, n, h), (1, t, n, h))
  q_pos = jnp.arange(t)[None]
  scores = t * t * 4 * n  # Bytes of the float32 T x T scores of every head.

  loss = lambda q, k, v: jnp.sum(dense.blocked(q, k, v, q_pos=q_pos, causal=True, scale=0.3,
                                                block=64)[0])
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp < scores / n / 4, (temp, scores)


def test_block_must_be_positive():
  q = jnp.zeros((1, 4, 1, 2))
  for block in (0, -8, 2.0, True):
    with pytest.raises(errors.Error, match=rf'block={block!r} must be a positive integer'):
      dense.blocked(q, q, q, q_pos=jnp.arange(4)[None], causal=False, scale=1.0, block=block)
