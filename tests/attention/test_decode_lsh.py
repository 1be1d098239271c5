"""Cached decoding of LSH attention (the strictly causal band): prefill, then one token at a time,
equals the causal `lsh.attend` over each row's whole sequence at every real position: several
buckets, 2 rounds with the duplicate count, a band narrower than the buckets, padding rows.
n_buckets is fixed: attend derives it from T, init_cache (n_buckets=None) from max_len."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import errors
from efflong.attention import lsh
from tests.attention.test_decode_linear import B, H, LENGTHS, N, check_rows, replay, sequences

HYPER = dict(n_hashes=2, bucket_size=2, n_buckets=4)
LENGTH = int(max(LENGTHS))


def test_lsh_decoding_equals_the_causal_band():
  q, _, v, mask = sequences(4, kv_heads=N)
  rng = jax.random.key(5)
  want = lsh.attend(q, q, v, mask=mask, rng=rng, **HYPER)
  # The band binds: some query has more than bucket_size earlier keys of its bucket in a round.
  unit = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  ids = np.asarray(lsh.buckets(unit, lsh.rotations(rng, num_heads=N, n_hashes=2, head_dim=H,
                                                   n_buckets=4), 4))
  earlier = (ids[..., None, :] == ids[..., :, None]) & np.tri(LENGTH, k=-1, dtype=bool)
  assert earlier.sum(-1).max() > HYPER['bucket_size']
  cache = lsh.init_cache(B, 32, num_kv_heads=N, head_dim=H, dtype=jnp.float32, **HYPER)
  got, cache = replay(jax.jit(functools.partial(lsh.attend_step, **HYPER)), cache, q, q, v, rng=rng)
  check_rows(got, want, 'lsh')


def test_lsh_cache_takes_attends_bucket_count_for_max_len():
  cache = lsh.init_cache(B, 300, num_kv_heads=N, head_dim=H, dtype=jnp.float32, n_hashes=2,
                         bucket_size=4)
  assert cache['ring'].shape == (B, N, 2, lsh.default_buckets(300, 4, H), 4)


@pytest.mark.parametrize('flags', [dict(causal_band=False), dict(attend_across_buckets=True)])
def test_lsh_decoding_refuses_the_chunked_form(flags):
  q, _, v, mask = sequences(4, kv_heads=N)
  cache = lsh.init_cache(B, 32, num_kv_heads=N, head_dim=H, dtype=jnp.float32, **HYPER)
  with pytest.raises(errors.Error, match='causal_band=True'):
    lsh.attend_step(q, q, v, cache, mask=mask, rng=jax.random.key(0), **HYPER, **flags)
