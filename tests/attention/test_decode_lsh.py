"""Cached decoding of LSH attention (the strictly causal band): prefill, then one token at a time,
equals the causal `lsh.attend` over each row's whole sequence at every real position: several
buckets, 2 rounds with the duplicate count, a band narrower than the buckets, padding rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import errors
from efflong.attention import lsh
from tests.attention.test_decode_linear import B, H, LENGTHS, N, check_rows, replay, sequences

HYPER = dict(n_hashes=2, bucket_size=2)
LENGTH = int(max(LENGTHS))


@pytest.mark.parametrize('n_buckets,max_len', [(4, 32), (None, LENGTH)])
def test_lsh_decoding_equals_the_causal_band(n_buckets, max_len):
  """n_buckets=None: the cache takes attend's count for max_len positions."""
  q, _, v, mask = sequences(4, kv_heads=N)
  rng = jax.random.key(5)
  want = lsh.attend(q, q, v, mask=mask, rng=rng, n_buckets=n_buckets, **HYPER)
  if n_buckets:  # The band binds: wider, it changes outputs.
    wide = lsh.attend(q, q, v, mask=mask, rng=rng, n_buckets=n_buckets, n_hashes=2, bucket_size=16)
    assert np.abs(np.asarray(want - wide)).max() > 1e-3
  cache = lsh.init_cache(B, max_len, num_kv_heads=N, head_dim=H, dtype=jnp.float32,
                         n_buckets=n_buckets, **HYPER)
  step = jax.jit(functools.partial(lsh.attend_step, n_buckets=n_buckets, **HYPER))
  got, cache = replay(step, cache, q, q, v, rng=rng)
  check_rows(got, want, f'lsh n_buckets={n_buckets}')


@pytest.mark.parametrize('flags', [dict(causal_band=False), dict(attend_across_buckets=True)])
def test_lsh_decoding_refuses_the_chunked_form(flags):
  q, _, v, mask = sequences(4, kv_heads=N)
  cache = lsh.init_cache(B, 32, num_kv_heads=N, head_dim=H, dtype=jnp.float32, **HYPER)
  with pytest.raises(errors.Error, match='causal_band=True'):
    lsh.attend_step(q, q, v, cache, mask=mask, rng=jax.random.key(0), **HYPER, **flags)
