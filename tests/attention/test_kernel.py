"""Kernel attention (linear, performer) against direct O(T^2) evaluations of the same formula.

The reference builds the T x S kernel matrix A_ij = phi(q_i) . phi(k_j), zeroes the pairs the mask
forbids, and returns A v / (A 1 + EPS). Features for the reference are computed here, in numpy, from
the papers' formulas (for performer without the stabiliser, which must cancel).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import Mask, dense, linear, performer
from tests.attention import arrays, close, vjp
from tests.helpers import segments

H = 4


def elu1(x):
  x = np.asarray(x, np.float64)
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0)))


def favor(x, w):
  """exp(W x' - |x'|^2 / 2) / sqrt(M), x' = x H^(-1/4) (Choromanski et al. 2021, Lemma 1)."""
  x = np.asarray(x, np.float64) * x.shape[-1] ** -0.25
  return np.exp(np.einsum('btnh,mh->btnm', x, np.asarray(w, np.float64))
                - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(w.shape[0])


def direct(qf, kf, v, allowed, eps=linear.EPS):
  """out [B, T, N, H] from features qf [B, T, N, M], kf [B, S, K, M] and allowed [B|1, T, S]."""
  n, kh = qf.shape[2], kf.shape[2]
  kf, v = jnp.repeat(kf, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
  a = jnp.einsum('BTNM,BSNM->BNTS', qf, kf) * allowed[:, None]
  return jnp.einsum('BNTS,BSNH->BTNH', a, v) / (a.sum(-1).transpose(0, 2, 1)[..., None] + eps)


CASES = {
    # name: (B, T, N, K, causal, segments, chunk)
    'causal_chunk_divides_T': (2, 12, 2, 2, True, None, 4),
    'causal_chunk_does_not_divide_T_gqa': (2, 13, 4, 2, True, None, 5),
    'causal_packed_mqa': (2, 14, 4, 1, True, 'packed', 4),
    'causal_padded_chunk_1': (2, 9, 2, 2, True, 'pad', 1),
    'bidirectional': (2, 11, 2, 2, False, None, 4),
    'bidirectional_packed_gqa': (2, 13, 4, 2, False, 'packed', 3),
    'bidirectional_padded_chunk_over_T': (2, 10, 2, 1, False, 'pad', 16),
}


@pytest.mark.parametrize('name', list(CASES))
@pytest.mark.parametrize('family', ['linear', 'performer'])
def test_equals_the_direct_formula(family, name):
  b, t, n, kh, causal, segs, chunk = CASES[name]
  q, k, v, dout = arrays((b, t, n, H), (b, t, kh, H), (b, t, kh, H), (b, t, n, H))
  mask = Mask.from_segments(segments(segs, b, t), causal=causal)
  allowed = mask.materialize(t, t)
  if family == 'linear':
    fn = lambda q, k, v: linear.attend(q, k, v, mask=mask, chunk=chunk)
    feats = lambda q, k: (jnp.asarray(elu1(q), jnp.float32), jnp.asarray(elu1(k), jnp.float32))
  else:
    w = performer.draw(jax.random.key(1), 8, H, orthogonal=True)
    fn = lambda q, k, v: performer.attend(q, k, v, mask=mask, projection=w, chunk=chunk)
    feats = lambda q, k: (jnp.asarray(favor(q, w), jnp.float32), jnp.asarray(favor(k, w),
                                                                              jnp.float32))
  out, grads = vjp(fn, (q, k, v), dout)
  eps = linear.EPS if family == 'linear' else 0.0   # FAVOR+ features are positive.
  close(out, direct(*feats(q, k), v, allowed, eps), 'out')
  if family == 'linear':  # Gradients through the same phi, in jax.
    phi = linear.FEATURE_MAPS['elu']
    ref = lambda q, k, v: direct(phi(q), phi(k), v, allowed)
  else:
    ref = lambda q, k, v: direct(performer.query_features(q, w, kernel='softmax'),
                                 performer.key_features(k, w, kernel='softmax', mask=Mask())[0],
                                 v, allowed, eps)
  _, want = vjp(ref, (q, k, v), dout)
  for got, exp, what in zip(grads, want, 'qkv'):
    close(got, exp, f'd{what}')


@pytest.mark.parametrize('chunk', [3, 4, 32])
def test_causal_chunks_equal_the_naive_prefix_sum(chunk):
  """S_i = cumsum_j phi(k_j) v_j^T over all T positions at once (O(T M H) memory)."""
  b, t, n = 2, 12, 2
  q, k, v = arrays((b, t, n, H), (b, t, n, H), (b, t, n, H), seed=3)
  qf, kf = linear.FEATURE_MAPS['elu'](q), linear.FEATURE_MAPS['elu'](k)
  s = jnp.cumsum(jnp.einsum('BTNM,BTNH->BTNMH', kf, v), axis=1)
  z = jnp.cumsum(kf, axis=1)
  want = (jnp.einsum('BTNM,BTNMH->BTNH', qf, s)
          / (jnp.einsum('BTNM,BTNM->BTN', qf, z)[..., None] + linear.EPS))
  close(linear.attend(q, k, v, mask=Mask(causal=True), chunk=chunk), want, f'chunk={chunk}')


def test_relu_kernels():
  b, t, n = 1, 10, 2
  q, k, v = arrays((b, t, n, H), (b, t, n, H), (b, t, n, H), seed=5)
  mask = Mask(causal=True)
  allowed = mask.materialize(t, t)
  relu = lambda x: jnp.maximum(x, 0.0)
  close(linear.attend(q, k, v, mask=mask, feature_map='relu', chunk=4),
         direct(relu(q), relu(k), v, allowed), 'linear relu')
  w = performer.draw(jax.random.key(2), 8, H, orthogonal=False)
  pf = lambda x: relu(jnp.einsum('BTNH,MH->BTNM', x * H ** -0.25, w)) * 8 ** -0.5
  close(performer.attend(q, k, v, mask=mask, projection=w, kernel='relu', chunk=4),
         direct(pf(q), pf(k), v, allowed), 'performer relu')


def test_padding_reaches_no_real_token():
  b, t, n = 1, 12, 2
  q, k, v = arrays((b, t, n, H), (b, t, n, H), (b, t, n, H), seed=6)
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3])
  for causal in (True, False):
    mask = Mask.from_segments(seg, causal=causal)
    base = linear.attend(q, k, v, mask=mask, chunk=4)
    moved_pad = linear.attend(q, k.at[:, 10].add(3.0), v.at[:, 10].add(3.0), mask=mask, chunk=4)
    np.testing.assert_allclose(moved_pad[:, :9], base[:, :9], atol=1e-6)
    moved_real = linear.attend(q, k.at[:, 6].add(3.0), v.at[:, 6].add(3.0), mask=mask, chunk=4)
    np.testing.assert_allclose(moved_real[:, :5], base[:, :5], atol=1e-6)
    assert np.abs(np.asarray(moved_real - base))[:, 5:9].max() > 1e-3


# FAVOR+ statistics.


def favor_variance(q, k, v, m):
  """Per output entry [B, T, N, H]: the first-order variance of FAVOR+ with m iid features.

  x, y are the H^(-1/4)-scaled queries and keys, p = softmax(x . y) and o = p v the exact output.
  With A_ij = exp(x_i . y_j) estimated as A_ij (1 + e_ij), the Gaussian integral of Lemma 1 gives
  Cov(e_ij, e_il) = (exp((x_i + y_j) . (x_i + y_l)) - 1) / m (j = l: Lemma 2's variance), and to
  first order in e the output error is sum_j p_ij e_ij (v_j - o_i).
  """
  h = q.shape[-1]
  x, y, v = (np.asarray(a, np.float64) for a in (q * h ** -0.25, k * h ** -0.25, v))
  logits = np.einsum('BTNH,BSNH->BNTS', x, y)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum('BNTS,BSNH->BNTH', p, v)
  c = p[..., None] * (np.swapaxes(v, 1, 2)[:, :, None] - o[:, :, :, None])  # [B, N, T, S, H]
  xx = np.einsum('BTNH,BTNH->BNT', x, x)[..., None, None]
  yy = np.einsum('BSNH,BLNH->BNSL', y, y)[:, :, None]
  cov = np.expm1(xx + logits[..., :, None] + logits[..., None, :] + yy) / m  # [B, N, T, S, L]
  return np.swapaxes(np.einsum('BNTSH,BNTSL,BNTLH->BNTH', c, cov, c), 1, 2)


def favor_error(m, seed, q, k, v):
  """||performer - dense|| with m orthogonal features drawn from seed."""
  w = performer.draw(jax.random.key(seed), m, q.shape[-1], orthogonal=True)
  got = np.asarray(performer.attend(q, k, v, mask=Mask(), projection=w), np.float64)
  return np.linalg.norm(got - np.asarray(dense.attend(q, k, v, mask=Mask())))


def favor_inputs():
  """q, k, v [1, 64, 2, 16]: T 64, N 2, H 16, standard normal times 0.5."""
  return arrays(*((1, 64, 2, 16),) * 3, seed=7, scale=0.5)


def test_favor_is_within_three_sigma_of_softmax_attention():
  """Performer at M = 4096 against dense attention, within 3 S, S^2 = sum of `favor_variance`.

  S^2 is E ||out - dense||^2 to first order for iid features, so by Markov's inequality a correct
  estimator exceeds 3 S with probability at most 1/9 (the draw is fixed: the test is deterministic).
  Orthogonal rows lower the variance of each kernel entry (Theorem 2). The inputs are chosen where
  the first order holds, every entry's relative deviation sqrt(expm1(|x + y|^2) / M) below 0.2, and
  where 3 S < 0.2 ||dense||, so that an output far from softmax attention (zeros, say) fails.
  """
  m = 4096
  q, k, v = favor_inputs()
  x, y = (np.asarray(a, np.float64) * q.shape[-1] ** -0.25 for a in (q, k))
  worst = np.max(np.sum((x[:, :, None] + y[:, None]) ** 2, -1))
  assert np.sqrt(np.expm1(worst) / m) < 0.2, worst
  bound = 3 * np.sqrt(favor_variance(q, k, v, m).sum())
  assert bound < 0.2 * np.linalg.norm(np.asarray(dense.attend(q, k, v, mask=Mask())))
  err = favor_error(m, 0, q, k, v)
  assert err < bound, (err, bound)


def test_favor_error_shrinks_with_m():
  """The error's standard deviation goes as M^(-1/2): 8 times the features divide it by about
  sqrt(8) = 2.8. The mean error over 4 draws must fall at least 1.8 times from M = 64 to 512 and
  from 512 to 4096; a bias (wrong features) does not shrink with M."""
  q, k, v = favor_inputs()
  errs = [np.mean([favor_error(m, s, q, k, v) for s in range(4)]) for m in (64, 512, 4096)]
  assert errs[0] > 1.8 * errs[1] and errs[1] > 1.8 * errs[2], errs


def test_orthogonal_features_beat_iid():
  """Kernel estimates phi(x) . phi(y) of exp(x . y) (Sec. 2.4, Theorem 2): lower mean squared
  error with orthogonal rows than with iid rows at equal M = 2H, over 200 draws."""
  h, t, m = 16, 32, 32
  x, y = (np.asarray(a, np.float64) * h ** -0.25
          for a in arrays((1, t, 2, h), (1, t, 2, h), seed=8, scale=0.4))
  true = np.exp(np.einsum('btnh,bsnh->bnts', x, y))

  def mse(orthogonal):
    errors = []
    for seed in range(200):
      w = np.asarray(performer.draw(jax.random.key(seed), m, h, orthogonal=orthogonal), np.float64)
      est = np.einsum('btnm,bsnm->bnts', favor(x * h ** 0.25, w), favor(y * h ** 0.25, w))
      errors.append(np.mean((est - true) ** 2))
    return np.mean(errors)

  orth, iid = mse(True), mse(False)
  assert orth < 0.9 * iid, (orth, iid)


@pytest.mark.parametrize('orthogonal', [True, False])
def test_rows_give_unbiased_kernel_estimates(orthogonal):
  """Lemma 1 needs each row w ~ N(0, I): E exp(w . a - |a|^2 / 2) = 1 for every a. Over 16 draws
  of M = 4096, H = 16, the mean is within 5 standard errors (of the 16 per-draw means) of 1, along
  each coordinate axis and the diagonal (1, ..., 1), both signs, |a| = 1.2."""
  h = 16
  dirs = np.concatenate([np.eye(h), np.ones((1, h)) / np.sqrt(h)])
  a = 1.2 * np.concatenate([dirs, -dirs])  # [D, H]
  means = np.stack([
      np.mean(np.exp(np.asarray(performer.draw(jax.random.key(s), 4096, h, orthogonal=orthogonal),
                                np.float64) @ a.T - 0.72), axis=0)
      for s in range(16)])  # [draws, D]; |a|^2 / 2 = 0.72.
  err = np.abs(means.mean(0) - 1) / (means.std(0, ddof=1) / np.sqrt(len(means)))
  assert err.max() < 5, (err.max(), means.mean(0)[err.argmax()])


def test_orthogonal_rows_are_orthogonal_within_blocks_with_chi_norms():
  w = np.asarray(performer.draw(jax.random.key(0), 40, 16, orthogonal=True))
  assert w.shape == (40, 16)
  for block in (w[:16], w[16:32]):
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)
  norms = np.linalg.norm(np.asarray(performer.draw(jax.random.key(1), 4096, 16, orthogonal=True)),
                         axis=1)
  assert abs(np.mean(norms ** 2) - 16) < 1.0  # chi(16): E|w|^2 = H.


# Errors.


@pytest.mark.parametrize('call, match', [
    (lambda q: linear.attend(q, q, q, mask=Mask(), feature_map='tanh'),
     r"feature_map='tanh'; valid: \['elu', 'relu'\]"),
    (lambda q: linear.attend(q, q, q, mask=Mask(causal=True), chunk=0),
     r'chunk=0 must be a positive integer'),
    (lambda q: performer.attend(q, q, q, mask=Mask(), projection=jnp.ones((4, H)), kernel='cos'),
     r"kernel='cos'; valid: \['softmax', 'relu'\]"),
    (lambda q: performer.draw(jax.random.key(0), 0, H, orthogonal=True),
     r'nb_features=0 must be a positive integer'),
    (lambda q: performer.attend(q, q, q, mask=Mask(), projection=jnp.ones((4, 3))),
     r'projection has shape \(4, 3\); expected \[M, H=4\]'),
])
def test_bad_input_is_one_clear_line(call, match):
  q = jnp.ones((1, 6, 2, H))
  with pytest.raises(ValueError, match=match) as info:
    call(q)
  assert '\n' not in str(info.value)
