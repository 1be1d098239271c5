"""linear.fused (features computed chunk by chunk inside the scans) against its twin,
linear.attend_features on the features computed whole: values and gradients in q, k, v.

linear.attend and performer.attend take the fused path without segment ids; the twin is the
formulation they take with them. Bidirectional, both ways: the whole sums (`_bidirectional`, the
default at these sizes) and, with WHOLE_MAX at 0, the scans, BLOCK shrunk so they take several
steps and pad their last one. Chunks do not divide T.
"""

import jax
import jax.numpy as jnp
import pytest

from efflong.attention import Mask, linear, performer
from tests.attention import arrays, close, vjp

B, H = 2, 8

CASES = {
    # name: (family, kernel, causal, T, S, N, K, chunk, whole)
    'linear_bidirectional_cross_gqa': ('linear', 'elu', False, 11, 13, 4, 2, 4, True),
    'linear_bidirectional_scans': ('linear', 'elu', False, 11, 13, 4, 2, 4, False),
    'linear_causal_gqa': ('linear', 'elu', True, 13, 13, 4, 2, 5, False),
    'performer_bidirectional_cross_gqa': ('performer', 'softmax', False, 10, 13, 4, 2, 4, True),
    'performer_bidirectional_scans': ('performer', 'softmax', False, 10, 13, 4, 2, 4, False),
    'performer_causal_gqa': ('performer', 'softmax', True, 14, 14, 4, 2, 4, False),
}


def _pair(family, kernel, mask, chunk, w):
  """(the attend under test, its twin through attend_features)."""
  if family == 'linear':
    phi = linear.FEATURE_MAPS[kernel]
    fast = lambda q, k, v: linear.attend(q, k, v, mask=mask, feature_map=kernel, chunk=chunk)
    twin = lambda q, k, v: linear.attend_features(phi(q), phi(k), v, mask=mask, chunk=chunk)
    return fast, twin

  eps = performer._eps(kernel)  # pylint: disable=protected-access

  def twin(q, k, v):
    kf, scale = performer.key_features(k, w, kernel=kernel, mask=mask)
    return linear.attend_features(performer.query_features(q, w, kernel=kernel), kf, v,
                                  mask=mask, chunk=chunk, eps=eps, key_scale=scale)

  return (lambda q, k, v: performer.attend(q, k, v, mask=mask, projection=w, kernel=kernel,
                                           chunk=chunk)), twin


@pytest.mark.parametrize('name', list(CASES))
def test_fused_equals_the_whole_features_twin(name, monkeypatch):
  family, kernel, causal, t, s, n, kh, chunk, whole = CASES[name]
  monkeypatch.setattr(linear, 'BLOCK', 4)
  if not whole:
    monkeypatch.setattr(linear, 'WHOLE_MAX', 0)
  q, k, v, dout = arrays((B, t, n, H), (B, s, kh, H), (B, s, kh, H), (B, t, n, H),
                         seed=len(name))
  # Keys of growing norm: the causal running scale rises across chunks (the state is rescaled).
  k = k * jnp.linspace(0.2, 3.0, s)[None, :, None, None]
  w = performer.draw(jax.random.key(0), 16, H, orthogonal=True)
  mask = Mask(causal=causal)
  assert linear.can_fuse(mask, 'xla', t, s, log_keys=kernel == 'softmax')
  fast, twin = _pair(family, kernel, mask, chunk, w)
  out, grads = vjp(fast, (q, k, v), dout)
  want, want_grads = vjp(twin, (q, k, v), dout)
  close(out, want, 'out')
  for got, exp, what in zip(grads, want_grads, 'qkv'):
    close(got, exp, f'd{what}')


def test_only_masks_without_segments_fuse():
  """Segment ids, global tokens, causal cross-attention and the Pallas kernel keep the twin."""
  seg = jnp.ones((1, 8), jnp.int32)
  assert not linear.can_fuse(Mask.from_segments(seg, causal=False), 'xla', 8, 8, log_keys=False)
  assert not linear.can_fuse(Mask(global_tokens=seg > 0), 'xla', 8, 8, log_keys=False)
  assert not linear.can_fuse(Mask(causal=True), 'xla', 4, 8, log_keys=False)
  assert not linear.can_fuse(Mask(causal=True), 'pallas', 8, 8, log_keys=False)
  assert not linear.can_fuse(Mask(causal=True), 'pallas', 8, 8, log_keys=True)
  assert linear.can_fuse(Mask(causal=True), 'auto', 8, 8, log_keys=True)
  assert linear.can_fuse(Mask(causal=False), 'pallas', 8, 8, log_keys=False)


def test_divide_equals_the_autodiff_division():
  """linear.divide's hand-written cotangents against autodiff's of num / den."""
  num, den, g = arrays((2, 5, 3, 4), (2, 5, 3), (2, 5, 3, 4), seed=9)
  den = jnp.abs(den) + 0.5
  out, grads = vjp(linear.divide, (num, den), g)
  want, want_grads = vjp(lambda n, d: n / d[..., None], (num, den), g)
  close(out, want, 'out')
  for got, exp, what in zip(grads, want_grads, ('dnum', 'dden')):
    close(got, exp, what)
