"""LSH attention: the one-chunk limit, a naive multi-round evaluation, leak probes and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import Mask, dense, lsh
from efflong.mask import NEG_INF
from tests.attention import arrays, close, vjp

H = 8


def _segments(kind, b, t):
  if kind is None:
    return None
  seg = np.ones((b, t), np.int32)
  if kind == 'packed':
    seg[:, t // 2:] = 2
    seg[-1, t - 2:] = 0
  seg[0, t - 3:] = 0
  return jnp.asarray(seg)


def rounds(q, v, allowed_rounds, repeat):
  """The paper's formula over explicit masks: per round r softmax attention of q against the
  unit-normalised keys q / |q| under allowed_rounds[r] [B, N, T, T] (a token's own logit SELF),
  then sum_r softmax_r(lse_r) out_r. q [B, T, N, H], v [B, T, K, H]."""
  b, t, n, h = q.shape
  v = jnp.repeat(v, repeat, axis=2)
  k = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) * h ** -0.5
  logits = jnp.where(jnp.eye(t, dtype=bool), lsh.SELF, logits)
  outs, lses = [], []
  for allowed in allowed_rounds:
    masked = jnp.where(allowed, logits, -jnp.inf)
    lse = jax.nn.logsumexp(masked, axis=-1)                      # [B, N, T]
    seen = jnp.isfinite(lse)
    probs = jnp.where(allowed, jnp.exp(masked - jnp.where(seen, lse, 0.0)[..., None]), 0.0)
    outs.append(jnp.einsum('BNTS,BSNH->BTNH', probs, v))
    lses.append(jnp.where(seen, lse, NEG_INF))
  weights = jax.nn.softmax(jnp.stack(lses), axis=0)              # [R, B, N, T]
  return sum(w.transpose(0, 2, 1)[..., None] * o for w, o in zip(weights, outs))


CASES = {
    # name: (B, T, N, K, causal, segments)
    'causal': (2, 10, 2, 2, True, None),
    'bidirectional_padded_gqa': (2, 9, 4, 2, False, 'pad'),
    'causal_packed': (2, 12, 2, 1, True, 'packed'),
}


@pytest.mark.parametrize('n_hashes', [1, 3])
@pytest.mark.parametrize('name', list(CASES))
def test_one_chunk_is_shared_qk_dense_attention_with_the_self_mask(name, n_hashes):
  """bucket_size >= T: every round sees every key, so the rounds agree and LSH is exact."""
  b, t, n, kh, causal, segs = CASES[name]
  q, v, dout = arrays((b, t, n, H), (b, t, kh, H), (b, t, n, H))
  mask = Mask.from_segments(_segments(segs, b, t), causal=causal)
  fn = lambda q, v: lsh.attend(q, q, v, mask=mask, rng=jax.random.key(0), n_hashes=n_hashes,
                               bucket_size=16)
  ref = lambda q, v: rounds(q, v, [mask.materialize(t, t)[:, None]], n // kh)
  (out, grads), (want, wgrads) = vjp(fn, (q, v), dout), vjp(ref, (q, v), dout)
  close(out, want, 'out')
  for got, exp, what in zip(grads, wgrads, 'qv'):
    close(got, exp, f'd{what}', rtol=2e-5)


def chunk_masks(q, rng, mask, n_hashes, bucket_size, n_buckets):
  """Per round [B, N, T, T]: query i sees key j when j's sorted chunk is i's or the one before
  (cyclically), and the mask allows it; built in numpy from the sort the paper describes."""
  b, t, n, h = q.shape
  padded = -(-t // bucket_size) * bucket_size
  qp = jnp.pad(q, [(0, 0), (0, padded - t), (0, 0), (0, 0)])
  rot = lsh.rotations(rng, num_heads=n, n_hashes=n_hashes, head_dim=h, n_buckets=n_buckets)
  bucket = np.asarray(lsh.buckets(qp / jnp.sqrt(jnp.sum(qp * qp, -1, keepdims=True) + 1e-6), rot,
                                  n_buckets))
  chunks = padded // bucket_size
  base = np.asarray(mask.materialize(t, t))[:, None]                 # [B|1, 1, T, T]
  out = []
  for r in range(n_hashes):
    seen = np.zeros((b, n, t, t), bool)
    for bi in range(b):
      for ni in range(n):
        order = np.lexsort((np.arange(padded), bucket[bi, ni, r]))    # by bucket, then position
        chunk_of = np.empty(padded, int)
        chunk_of[order] = np.arange(padded) // bucket_size
        ci, cj = chunk_of[:t, None], chunk_of[None, :t]
        seen[bi, ni] = (cj == ci) | (cj == (ci - 1) % chunks) if chunks > 1 else True
    out.append(jnp.asarray(seen & base))
  return out


MULTI = {
    # name: (B, T, N, K, causal, segments, n_hashes, bucket_size, n_buckets)
    'causal_4_rounds': (2, 16, 2, 2, True, None, 4, 4, 4),
    'bidirectional_padded_T%bucket_2_rounds_gqa': (2, 13, 4, 2, False, 'pad', 2, 4, None),
    'causal_packed_2_chunks': (2, 8, 2, 2, True, 'packed', 2, 4, 6),
    'bidirectional_factorised_36_buckets': (1, 24, 2, 2, False, None, 2, 4, 36),
}


@pytest.mark.parametrize('name', list(MULTI))
def test_multi_round_equals_a_naive_evaluation(name):
  b, t, n, kh, causal, segs, n_hashes, bucket_size, n_buckets = MULTI[name]
  q, v, dout = arrays((b, t, n, H), (b, t, kh, H), (b, t, n, H), seed=1)
  mask = Mask.from_segments(_segments(segs, b, t), causal=causal)
  rng = jax.random.key(3)
  fn = lambda q, v: lsh.attend(q, q, v, mask=mask, rng=rng, n_hashes=n_hashes,
                               bucket_size=bucket_size, n_buckets=n_buckets)
  nb = n_buckets or lsh.default_buckets(t, bucket_size, H)
  allowed = chunk_masks(q, rng, mask, n_hashes, bucket_size, nb)
  assert any(not np.asarray(a).all() for a in allowed)    # the chunks really restrict attention
  ref = lambda q, v: rounds(q, v, allowed, n // kh)       # buckets fixed: same sort, grads via q
  (out, grads), (want, wgrads) = vjp(fn, (q, v), dout), vjp(ref, (q, v), dout)
  close(out, want, 'out')
  for got, exp, what in zip(grads, wgrads, 'qv'):
    close(got, exp, f'd{what}', rtol=2e-5)


@pytest.mark.parametrize('causal', [True, False])
def test_no_weight_on_future_or_pad_keys(causal):
  """Changing the values of tokens from position 6 on (causal) or of pad tokens moves no output
  that must not see them. (Values only: a changed key re-hashes and re-sorts; see the notes.)"""
  b, t, n = 2, 16, 2
  q, v = arrays((b, t, n, H), (b, t, n, H), seed=2)
  seg = None if causal else _segments('pad', b, t)
  changed = np.arange(t)[None] >= 6 if causal else np.asarray(seg) == 0   # [1|B, T]
  attend = jax.jit(functools.partial(lsh.attend, mask=Mask.from_segments(seg, causal=causal),
                                     rng=jax.random.key(1), n_hashes=4, bucket_size=4))
  moved = np.abs(np.asarray(attend(q, q, v + 5.0 * changed[..., None, None]) - attend(q, q, v)))
  blind = np.broadcast_to(~changed, (b, t))
  assert moved[blind].max() < 1e-6 and moved[~blind].max() > 1e-3


def test_factorised_buckets_use_every_id():
  """36 buckets at H = 8 hash as 6 x 6: ids cover 0..35, both digits vary."""
  assert lsh.factors(36, H) == (6, 6) and lsh.factors(16, H) == (16,)
  assert lsh.default_buckets(4096, 64, 64) == 128 and lsh.default_buckets(65536, 64, 64) == 2048
  x = arrays((1, 4096, 1, H), seed=5)[0]
  rot = lsh.rotations(jax.random.key(0), num_heads=1, n_hashes=1, head_dim=H, n_buckets=36)
  assert rot.shape == (1, 1, H, 6)
  ids = np.asarray(lsh.buckets(x, rot, 36))
  assert ids.min() == 0 and ids.max() == 35 and len(np.unique(ids)) == 36


def test_a_token_attends_to_itself_only_when_nothing_else_is_there():
  q, v = arrays((1, 8, 1, H), (1, 8, 1, H), seed=4)
  out = lsh.attend(q, q, v, mask=Mask(causal=True), rng=jax.random.key(0), bucket_size=8)
  np.testing.assert_allclose(out[0, 0], v[0, 0], rtol=1e-6)   # Position 0 sees only itself.
  assert np.abs(np.asarray(out[0, 1] - v[0, 1])).max() > 1e-3


@pytest.mark.parametrize('kw,match', [
    ({'n_hashes': 0}, r'n_hashes=0 must be an int >= 1'),
    ({'bucket_size': 0}, r'bucket_size=0 must be an int >= 1'),
    ({'n_buckets': 5}, r'n_buckets=5 must be an even int >= 2'),
])
def test_bad_hyper_parameters_get_one_clear_line(kw, match):
  q = jnp.ones((1, 4, 1, H))
  with pytest.raises(ValueError, match=match) as info:
    lsh.attend(q, q, q, mask=Mask(causal=True), rng=jax.random.key(0), **kw)
  assert '\n' not in str(info.value)
