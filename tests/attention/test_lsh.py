"""LSH attention against a reference written from the paper, limits, leak probes and errors.

The reference (`reference`) shares nothing with efflong/attention/lsh.py but the random rotation
matrices (`lsh.rotations`, the randomness itself): it hashes in numpy, builds each round's window P_i
from the paper's definitions over positions (not sorted indices), and takes the softmax over the
union of the rounds' windows with each key counted once (allow_duplicates=False, the appendix's
-log N_ij) or N_ij times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import Mask, lsh
from tests.attention import arrays, close, vjp
from tests.helpers import segments

H = 8


def hashes(q, rot):
  """Buckets [B, N, R, T] in numpy: argmax over [x R; -x R] of the unit keys (section 2)."""
  x = np.asarray(q, np.float64)
  x = x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
  xr = np.einsum('btnh,nrhu->bnrtu', x, np.asarray(rot, np.float64))
  return np.argmax(np.concatenate([xr, -xr], -1), -1)


def windows(bucket, bucket_size, *, band, across):
  """[B, N, R, T, T] bool: whether key j is in query i's window in round r, from the paper.

  band: j is i, or among the bucket_size most recent tokens before i (by position) in i's bucket.
  Otherwise: sort the padded sequence by (bucket, position), cut it into chunks of bucket_size;
  j is in i's chunk or the one before (cyclically), and in i's bucket unless across.
  """
  b, n, r, padded = bucket.shape
  t = padded
  out = np.zeros((b, n, r, t, t), bool)
  for bi, ni, ri in np.ndindex(b, n, r):
    ids = bucket[bi, ni, ri]
    same = ids[:, None] == ids[None, :]
    if band:
      for i in range(t):
        earlier = [j for j in range(i) if ids[j] == ids[i]]
        out[bi, ni, ri, i, earlier[-bucket_size:] + [i]] = True
      continue
    order = np.lexsort((np.arange(t), ids))
    chunk = np.empty(t, int)
    chunk[order] = np.arange(t) // bucket_size
    chunks = t // bucket_size
    ci, cj = chunk[:, None], chunk[None, :]
    near = (cj == ci) | (cj == (ci - 1) % chunks)
    out[bi, ni, ri] = near if across else near & same
  return out


def counts(q, mask, rng, *, n_hashes, bucket_size, n_buckets, band, across):
  """N_ij [B, N, T, T]: in how many rounds key j is in query i's window (0 where the mask forbids
  the pair); from concrete q [B, T, N, H]."""
  b, t, n, h = q.shape
  padded = -(-t // bucket_size) * bucket_size
  qp = jnp.pad(q, [(0, 0), (0, padded - t), (0, 0), (0, 0)])
  rot = lsh.rotations(rng, num_heads=n, n_hashes=n_hashes, head_dim=h, n_buckets=n_buckets)
  seen = windows(hashes(qp, rot), bucket_size, band=band, across=across)[..., :t, :t]
  return jnp.asarray(seen.sum(2) * np.asarray(mask.materialize(t, t))[:, None])


def reference(q, v, count, *, duplicates):
  """LSH attention from the paper's definitions: softmax over the keys with N_ij > 0, each counted
  once (or N_ij times with duplicates); q [B, T, N, H], v [B, T, K, H]; a token's own logit SELF."""
  b, t, n, h = q.shape
  allowed = count > 0
  v = jnp.repeat(v, n // v.shape[2], axis=2)
  k = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) * h ** -0.5
  if duplicates:
    logits = logits + jnp.log(jnp.maximum(count, 1))
  logits = jnp.where(jnp.eye(t, dtype=bool), lsh.SELF, logits)
  probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  probs = jnp.where(allowed.any(-1, keepdims=True), probs, 0.0)
  return jnp.einsum('BNTS,BSNH->BTNH', probs, v)


FULL = dict(attend_across_buckets=True, causal_band=False)   # one chunk: exactly full attention
CASES = {
    # name: (B, T, N, K, causal, segments)
    'causal': (2, 10, 2, 2, True, None),
    'bidirectional_padded_gqa': (2, 9, 4, 2, False, 'pad'),
    'causal_packed': (2, 12, 2, 1, True, 'packed'),
}


@pytest.mark.parametrize('n_hashes', [1, 3])
@pytest.mark.parametrize('name', list(CASES))
def test_one_chunk_across_buckets_is_shared_qk_dense_attention(name, n_hashes):
  """bucket_size >= T and every bucket visible: each round sees every key, LSH is exact."""
  b, t, n, kh, causal, segs = CASES[name]
  q, v, dout = arrays((b, t, n, H), (b, t, kh, H), (b, t, n, H))
  mask = Mask.from_segments(segments(segs, b, t), causal=causal)
  fn = lambda q, v: lsh.attend(q, q, v, mask=mask, rng=jax.random.key(0), n_hashes=n_hashes,
                               bucket_size=16, **FULL)
  nb = lsh.default_buckets(t, 16, H)
  count = counts(q, mask, jax.random.key(0), n_hashes=n_hashes, bucket_size=16, n_buckets=nb,
                 band=False, across=True)
  assert np.array_equal(count > 0, np.broadcast_to(mask.materialize(t, t)[:, None], count.shape))
  ref = lambda q, v: reference(q, v, count, duplicates=False)
  (out, grads), (want, wgrads) = vjp(fn, (q, v), dout), vjp(ref, (q, v), dout)
  close(out, want, 'out')
  for got, exp, what in zip(grads, wgrads, 'qv'):
    close(got, exp, f'd{what}', rtol=2e-5)


MULTI = {
    # name: (B, T, N, K, causal, segments, n_hashes, bucket_size, n_buckets)
    'causal_4_rounds': (2, 16, 2, 2, True, None, 4, 4, 4),
    'bidirectional_padded_T%bucket_2_rounds_gqa': (2, 13, 4, 2, False, 'pad', 2, 4, None),
    'causal_packed_2_chunks': (2, 8, 2, 2, True, 'packed', 2, 4, 6),
    'causal_1_round': (1, 24, 2, 2, True, None, 1, 4, 4),
    'bidirectional_3_rounds': (1, 20, 2, 1, False, None, 3, 4, 4),
}
SETTINGS = {
    # name: (attend_across_buckets, allow_duplicates, causal_band)
    'paper': (False, False, True),
    'chunked_paper': (False, False, False),
    'across_buckets_duplicates': (True, True, False),    # efflong before the paper's settings
    'duplicates': (False, True, True),
}
PAIRS = [  # each setting causal and bidirectional, multi-round, packed or padded
    ('causal_4_rounds', 'paper'), ('causal_4_rounds', 'across_buckets_duplicates'),
    ('causal_4_rounds', 'duplicates'), ('bidirectional_padded_T%bucket_2_rounds_gqa', 'paper'),
    ('bidirectional_padded_T%bucket_2_rounds_gqa', 'across_buckets_duplicates'),
    ('causal_packed_2_chunks', 'paper'), ('causal_packed_2_chunks', 'chunked_paper'),
    ('causal_1_round', 'paper'), ('bidirectional_3_rounds', 'paper'),
    ('bidirectional_3_rounds', 'duplicates'),
]


@pytest.mark.parametrize('name,setting', PAIRS)
def test_equals_the_papers_definition(name, setting):
  """Values and gradients against `reference`, for the paper's settings and the others."""
  b, t, n, kh, causal, segs, n_hashes, bucket_size, n_buckets = MULTI[name]
  across, duplicates, band = SETTINGS[setting]
  q, v, dout = arrays((b, t, n, H), (b, t, kh, H), (b, t, n, H), seed=1)
  mask = Mask.from_segments(segments(segs, b, t), causal=causal)
  rng = jax.random.key(3)
  kw = dict(n_hashes=n_hashes, bucket_size=bucket_size, n_buckets=n_buckets)
  fn = lambda q, v: lsh.attend(q, q, v, mask=mask, rng=rng, attend_across_buckets=across,
                               allow_duplicates=duplicates, causal_band=band, **kw)
  kw['n_buckets'] = n_buckets or lsh.default_buckets(t, bucket_size, H)
  count = counts(q, mask, rng, band=band and causal, across=across, **kw)
  ref = lambda q, v: reference(q, v, count, duplicates=duplicates)
  (out, grads), (want, wgrads) = vjp(fn, (q, v), dout), vjp(ref, (q, v), dout)
  close(out, want, 'out')
  for got, exp, what in zip(grads, wgrads, 'qv'):
    close(got, exp, f'd{what}', rtol=2e-5)


def test_the_settings_restrict_and_differ():
  """The reference's windows are not everything, and each setting gives another output."""
  b, t, n, kh, causal, segs, n_hashes, bucket_size, nb = MULTI['causal_4_rounds']
  q, v = arrays((b, t, n, H), (b, t, kh, H), seed=1)
  rot = lsh.rotations(jax.random.key(3), num_heads=n, n_hashes=n_hashes, head_dim=H, n_buckets=nb)
  seen = windows(hashes(q, rot), bucket_size, band=True, across=False)
  assert not seen.any(2)[..., np.tril_indices(t)[0], np.tril_indices(t)[1]].all()
  outs = [lsh.attend(q, q, v, mask=Mask(causal=True), rng=jax.random.key(3), n_hashes=n_hashes,
                     bucket_size=bucket_size, n_buckets=nb, attend_across_buckets=a,
                     allow_duplicates=d, causal_band=c) for a, d, c in SETTINGS.values()]
  for i in range(len(outs)):
    for j in range(i):
      assert np.abs(np.asarray(outs[i] - outs[j])).max() > 1e-4, (i, j)


def _future_probe(band: bool) -> tuple[float, float]:
  """Causal, T = 64, bucket 8, 2 rounds: every token after t (queries, keys and values) replaced;
  returns (the largest move of an output at <= t, the fraction of positions <= t that moved)."""
  b, t, n = 1, 64, 2
  q, v, q2, v2 = arrays((b, t, n, H), (b, t, n, H), (b, t, n, H), (b, t, n, H), seed=7)
  kw = dict(n_hashes=2, bucket_size=8, causal_band=band, attend_across_buckets=not band)
  attend = jax.jit(lambda q, v: lsh.attend(q, q, v, mask=Mask(causal=True), rng=jax.random.key(2),
                                           **kw))
  base, worst, moved = np.asarray(attend(q, v)), 0.0, []
  for cut in (15, 31, 47):
    later = np.arange(t)[None, :, None, None] > cut
    out = np.asarray(attend(jnp.where(later, q2, q), jnp.where(later, v2, v)))
    diff = np.abs(out - base)[:, :cut + 1].max(axis=(0, 2, 3))
    worst, moved = max(worst, diff.max()), moved + list(diff > 1e-5)
  return worst, float(np.mean(moved))


def test_the_band_form_is_causal_and_the_chunked_form_is_not():
  """Tokens after t (queries too: they re-hash and re-sort) move no output at <= t in the band
  form; in the chunked form they do (the probe can fail)."""
  assert _future_probe(band=True)[0] < 1e-5
  worst, moved = _future_probe(band=False)
  assert worst > 0.1 and moved > 0.3


@pytest.mark.parametrize('causal', [True, False])
def test_no_weight_on_future_or_pad_keys(causal):
  """Changing the values of tokens from position 6 on (causal) or of pad tokens moves no output
  that must not see them, in the chunked form too."""
  b, t, n = 2, 16, 2
  q, v = arrays((b, t, n, H), (b, t, n, H), seed=2)
  seg = None if causal else segments('pad', b, t)
  changed = np.arange(t)[None] >= 6 if causal else np.asarray(seg) == 0   # [1|B, T]
  for band in (True, False):
    attend = jax.jit(functools.partial(lsh.attend, mask=Mask.from_segments(seg, causal=causal),
                                       rng=jax.random.key(1), n_hashes=4, bucket_size=4,
                                       causal_band=band))
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


def test_factorised_buckets_follow_the_papers_definition():
  """With factorised buckets (36 = 6 x 6 at H = 8) the implementation still equals the windows
  of its own buckets (the reference's numpy hashing covers the unfactorised case only)."""
  b, t, n = 1, 24, 2
  q, v = arrays((b, t, n, H), (b, t, n, H), seed=6)
  rng = jax.random.key(4)
  out = lsh.attend(q, q, v, mask=Mask(causal=True), rng=rng, n_hashes=2, bucket_size=4,
                   n_buckets=36)
  rot = lsh.rotations(rng, num_heads=n, n_hashes=2, head_dim=H, n_buckets=36)
  bucket = np.asarray(lsh.buckets(q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6), rot, 36))
  count = windows(bucket, 4, band=True, across=False).sum(2) * np.tril(np.ones((t, t), int))
  close(out, reference(q, v, jnp.asarray(count), duplicates=False), 'out')


def test_a_token_attends_to_itself_only_when_nothing_else_is_there():
  q, v = arrays((1, 8, 1, H), (1, 8, 1, H), seed=4)
  out = lsh.attend(q, q, v, mask=Mask(causal=True), rng=jax.random.key(0), bucket_size=8, **FULL)
  np.testing.assert_allclose(out[0, 0], v[0, 0], rtol=1e-6)   # Position 0 sees only itself.
  assert np.abs(np.asarray(out[0, 1] - v[0, 1])).max() > 1e-3


@pytest.mark.parametrize('kw,match', [
    ({'n_hashes': 0}, r'n_hashes=0 must be an int >= 1'),
    ({'bucket_size': 0}, r'bucket_size=0 must be an int >= 1'),
    ({'n_buckets': 5}, r'n_buckets=5 must be an even int >= 2'),
    ({'allow_duplicates': 1}, r'allow_duplicates=1 must be True or False'),
    ({'attend_across_buckets': True}, r'causal_band=True needs attend_across_buckets=False'),
    ({'n_hashes': 2, 'impl': 'pallas'}, r'allow_duplicates=False \(the -log N_ij count\) has no '
                                        'Pallas path'),
])
def test_bad_hyper_parameters_get_one_clear_line(kw, match):
  q = jnp.ones((1, 4, 1, H))
  with pytest.raises(ValueError, match=match) as info:
    lsh.attend(q, q, q, mask=Mask(causal=True), rng=jax.random.key(0), **kw)
  assert '\n' not in str(info.value)
