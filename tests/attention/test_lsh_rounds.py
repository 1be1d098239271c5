"""LSH's batched rounds against plain twins: the sort (packed keys and the pair sort), the gathers
with their inverse-permutation gradients, and `attend_rounds` (custom backward) against one softmax
over the union of the rounds' windows, differentiated by autodiff. Values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong.attention import lsh
from efflong.mask import NEG_INF
from tests.attention import arrays, close, vjp

B, N, R, TP, C, H = 2, 2, 3, 12, 4, 8


def permutations(seed, shape=(B, N, R, TP)):
  """(perm, inverse) [B, N, R, Tp] int32: random permutations of each row and their inverses."""
  rng = np.random.default_rng(seed)
  perm = np.argsort(rng.random(shape), axis=-1)
  return jnp.asarray(perm, jnp.int32), jnp.asarray(np.argsort(perm, axis=-1), jnp.int32)


@pytest.mark.parametrize('packed', [True, False])
def test_sort_buckets_is_the_stable_argsort(packed, monkeypatch):
  """Both branches (keys bucket * Tp + position; the pair sort past int32) sort by (bucket,
  position), give the sorted buckets and the inverse permutation."""
  if not packed:
    monkeypatch.setattr(lsh, 'PACKED_KEYS', 0)
  bucket = np.random.default_rng(0).integers(0, 6, (B, N, R, 40)).astype(np.int32)
  ordered, perm, inverse = map(np.asarray, lsh.sort_buckets(jnp.asarray(bucket), 6))
  want = np.argsort(bucket, axis=-1, kind='stable')
  np.testing.assert_array_equal(perm, want)
  np.testing.assert_array_equal(ordered, np.take_along_axis(bucket, want, -1))
  np.testing.assert_array_equal(np.take_along_axis(perm, inverse, -1),
                                np.broadcast_to(np.arange(40), perm.shape))


def test_sort_and_unsort_rounds_equal_plain_gathers():
  """sort_rounds and unsort_rounds (custom gradients: gathers by the inverse permutation) against
  take_along_axis and the softmax over rounds, differentiated by autodiff."""
  perm, inverse = permutations(1)
  x, out, lse, g_sorted, g = arrays((B, TP, N, H), (B, N, R, TP, H), (B, N, R, TP),
                                    (B, N, R, TP, H), (B, TP, N, H), seed=2)
  heads = lambda x: jnp.broadcast_to(jnp.moveaxis(x, 2, 1)[:, :, None], (B, N, R, TP, H))
  plain_sort = lambda x: jnp.take_along_axis(heads(x), perm[..., None], axis=3)
  fast_sort = lambda x: lsh.sort_rounds((x,), perm, inverse)[0]

  def plain_unsort(out, lse):
    back = lambda y: jnp.take_along_axis(y, inverse.reshape(inverse.shape + (1,) * (y.ndim - 4)),
                                         axis=3)
    out = jnp.sum(back(out) * jax.nn.softmax(back(lse), axis=2)[..., None], axis=2)
    return jnp.moveaxis(out, 1, 2)

  fast_unsort = lambda out, lse: lsh.unsort_rounds(out, lse, perm, inverse)
  for fast, plain, args, dout in [(fast_sort, plain_sort, (x,), g_sorted),
                                  (fast_unsort, plain_unsort, (out, lse), g)]:
    (got, grads), (want, wgrads) = vjp(fast, args, dout), vjp(plain, args, dout)
    close(got, want, 'out')
    for i, (a, b) in enumerate(zip(grads, wgrads)):
      close(a, b, f'grad {i}', rtol=2e-5)


def plain_rounds(q, k, v, allowed, bias, perm, inverse, chunk):
  """`attend_rounds` as one masked softmax per position over all its rounds' key slots [R * S]:
  each sorted slot's logits and look-back values brought back to its position, autodiff."""
  b, n, r, tp, h = q.shape
  chunks = tp // chunk
  split = lambda x: x.reshape(b, n, r, chunks, chunk, *x.shape[4:])
  back = lambda x: (jnp.concatenate([split(x), jnp.roll(split(x), 1, axis=3)], axis=4)
                    if chunks > 1 else split(x))
  logits = jnp.einsum('bnrlch,bnrlsh->bnrlcs', split(q), back(k)) * h ** -0.5
  width = logits.shape[-1]
  logits = jnp.where(np.eye(chunk, width, dtype=bool), lsh.SELF, logits + bias)
  logits = jnp.where(allowed, logits, NEG_INF)
  seen = jnp.broadcast_to(allowed, logits.shape)
  values = jnp.broadcast_to(back(v)[..., None, :, :], logits.shape + (h,))
  # Sorted slot -> position, per round: [B, N, R, Tp, S(, H)] -> [B, N, Tp, R * S(, H)].
  flat = lambda x: x.reshape(b, n, r, tp, *x.shape[5:])
  home = lambda x: jnp.take_along_axis(flat(x), inverse.reshape(inverse.shape + (1,) * (
      x.ndim - 5)), axis=3)
  union = lambda x: jnp.moveaxis(home(x), 2, 3).reshape(b, n, tp, r * width, *x.shape[6:])
  probs = jax.nn.softmax(union(logits), axis=-1) * union(seen)
  probs = probs / jnp.maximum(jnp.sum(probs, -1, keepdims=True), 1e-30)
  return jnp.moveaxis(jnp.einsum('bnts,bntsh->bnth', probs, union(values)), 1, 2)


@pytest.mark.parametrize('r,tp', [(R, TP), (1, C)])
def test_attend_rounds_equals_one_softmax_over_the_union(r, tp):
  """Values and gradients of q, k, v, with the SELF logit, a bias, masked pairs and queries that
  see nothing; 3 rounds over 3 chunks, and 1 round of a lone chunk (no look-back)."""
  perm, inverse = permutations(3, (B, N, r, tp))
  q, k, v, dout = arrays(*[(B, N, r, tp, H)] * 3, (B, tp, N, H), seed=4)
  width = 2 * C if tp > C else C
  rng = np.random.default_rng(5)
  allowed = rng.random((B, N, r, tp // C, C, width)) < 0.6
  for u, slot in enumerate(np.asarray(inverse)[0, 0, :, 1]):   # Position 1 sees nothing.
    allowed[0, 0, u, slot // C, slot % C] = False
  allowed = jnp.asarray(allowed)
  bias = jnp.asarray(-np.log(rng.integers(1, 4, allowed.shape)), jnp.float32)
  fast = lambda q, k, v: lsh.attend_rounds(q, k, v, allowed, bias, perm, inverse, C)
  plain = lambda q, k, v: plain_rounds(q, k, v, allowed, bias, perm, inverse, C)
  (got, grads), (want, wgrads) = vjp(fast, (q, k, v), dout), vjp(plain, (q, k, v), dout)
  close(got, want, 'out')
  assert np.abs(np.asarray(got)[0, 1, 0]).max() == 0
  for a, b, what in zip(grads, wgrads, 'qkv'):
    close(a, b, f'd{what}', rtol=2e-5)
