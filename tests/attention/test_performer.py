"""Performer's key stabiliser: only keys a query may combine it with set the scale.

The reference evaluates FAVOR+ (Choromanski et al. 2021, Lemma 1) in float64 in the log domain,
so it needs no stabiliser: weight(i, j) = sum_m exp(e_q[i, m] + e_k[j, m]) with
e = W x - |x|^2 / 2, x = input * H^(-1/4), normalised over the keys i may see.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import Mask, performer
from tests.attention import arrays, close

B, T, N, H, M = 1, 12, 1, 8, 16


def _exponents(x, w):
  x = np.asarray(x, np.float64) * H ** -0.25
  return np.einsum('btnh,mh->btnm', x, np.asarray(w, np.float64)) - 0.5 * (x * x).sum(-1)[..., None]


def reference(q, k, v, w, allowed):
  """out [B, T, N, H] in float64; allowed [B, T, T] bool."""
  eq, ek = _exponents(q, w), _exponents(k, w)
  pair = eq[:, :, None] + ek[:, None, :]                       # [B, T, S, N, M]
  top = pair.max(-1, keepdims=True)
  log_w = (top + np.log(np.exp(pair - top).sum(-1, keepdims=True)))[..., 0]   # [B, T, S, N]
  log_w = np.where(allowed[..., None], log_w, -np.inf)
  weights = np.exp(log_w - log_w.max(2, keepdims=True))
  weights /= weights.sum(2, keepdims=True)
  return np.einsum('btsn,bsnh->btnh', weights, np.asarray(v, np.float64))


def _inputs(seed=0):
  q, k, v = arrays((B, T, N, H), (B, T, N, H), (B, T, N, H), seed=seed)
  w = performer.draw(jax.random.key(seed), M, H, orthogonal=True)
  return q, 0.05 * k, v, w


def _aligned(w):
  """The key whose exponent is the largest any key can have along feature 0: x = w_0, e = |w_0|^2/2."""
  return w[0] * H ** 0.25


def _far(seed, norm=40.0):
  """[T, H] keys of the given norm in random directions: exponents near -|x|^2 / 2 (about -280)."""
  u = np.random.default_rng(seed).standard_normal((T, H))
  return jnp.asarray(norm * u / np.linalg.norm(u, axis=-1, keepdims=True), jnp.float32)


@pytest.mark.parametrize('chunk', [4, 64])
def test_a_large_future_key_does_not_blank_the_visible_small_ones(chunk):
  """Causal: keys 0..T-2 have tiny features (exponents near -280), key T-1 the largest possible.
  A max over all keys (the reference implementations') underflows every visible key of rows < T-1
  to zero; the running max does not."""
  q, _, v, w = _inputs()
  k = _far(0)[None, :, None].at[0, T - 1, 0].set(_aligned(w))
  e = _exponents(k, w)[0, :, 0].max(-1)
  assert e[-1] - e[:-1].max() > 110
  out = performer.attend(q, k, v, mask=Mask(causal=True), projection=w, chunk=chunk)
  want = reference(q, k, v, w, np.tril(np.ones((T, T), bool))[None])
  close(out[:, :T - 1], want[:, :T - 1], 'rows before the large key', rtol=1e-4)
  assert np.abs(np.asarray(out[:, :T - 1])).max(axis=-1).min() > 1e-3   # no blank row


def test_keys_growing_along_the_sequence_stay_finite_and_exact():
  """Causal, key exponents growing from about -280 to the largest possible along the row: the
  carried sums are rescaled as the running max grows."""
  q, _, v, w = _inputs(seed=1)
  mix = jnp.linspace(0.0, 1.0, T)[:, None]
  k = ((1 - mix) * _far(1) + mix * _aligned(w))[None, :, None]
  e = _exponents(k, w)[0, :, 0].max(-1)
  assert e[-1] - e[0] > 100
  for chunk in (3, 64):
    out = performer.attend(q, k, v, mask=Mask(causal=True), projection=w, chunk=chunk)
    assert np.isfinite(np.asarray(out)).all()
    close(out, reference(q, k, v, w, np.tril(np.ones((T, T), bool))[None]), f'chunk {chunk}',
          rtol=1e-4)


@pytest.mark.parametrize('causal', [False, True])
def test_another_packed_sequence_does_not_set_the_scale(causal):
  """Packed: sequence 2 holds the largest possible key, sequence 1 small ones; sequence 1's rows
  are exact (a shared max would blank them)."""
  q, k, v, w = _inputs(seed=2)
  k = _far(2)[None, :, None].at[0, T - 2, 0].set(_aligned(w))
  seg = jnp.asarray([[1] * (T // 2) + [2] * (T // 2)], jnp.int32)
  mask = Mask.from_segments(seg, causal=causal)
  out = performer.attend(q, k, v, mask=mask, projection=w, chunk=4)
  allowed = np.asarray(mask.materialize(T, T))
  close(out[:, :T // 2], reference(q, k, v, w, allowed)[:, :T // 2], 'sequence 1', rtol=1e-4)


def test_padding_between_packed_sequences_stays_finite():
  """Pad id 0 recurs after a gap (before and after sequence 2); the keys before the gap are far
  larger, so the scale drops between two runs of one id: every output stays finite."""
  q, _, v, w = _inputs(seed=3)
  seg = jnp.asarray([[1, 1, 1, 0, 0, 0, 2, 2, 2, 0, 0, 0]], jnp.int32)
  k = jnp.where(jnp.arange(T)[None, :, None, None] < 6, _aligned(w), _far(3)[None, :, None])
  for causal in (True, False):
    out = performer.attend(q, k, v, mask=Mask.from_segments(seg, causal=causal), projection=w,
                           chunk=T)
    assert np.isfinite(np.asarray(out)).all()
