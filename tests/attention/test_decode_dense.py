"""Cached decoding of dense attention against one causal call, and the registry's decode checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import attention, errors
from efflong.attention import Family, Mask, dense


def _decode(step, cache, q, k, v, schedule):
  """Feeds each row its own sequence through step, call by call.

  schedule: per call, the number of real new positions per row (the call's T is the largest;
  the rest of a row's block is padding). Returns out [B, L, N, H] at each row's fed positions.
  """
  b, length = q.shape[0], q.shape[1]
  out = np.zeros(q.shape, np.float32)
  fed = np.zeros(b, int)
  for counts in schedule:
    t = max(counts)
    idx = np.minimum(fed[:, None] + np.arange(t), length - 1)  # [B, T] positions to feed
    take = lambda x: jnp.asarray(np.take_along_axis(np.asarray(x), idx[:, :, None, None], 1))
    seg = jnp.asarray(np.arange(t)[None] < np.asarray(counts)[:, None], jnp.int32)
    o, cache = step(take(q), take(k), take(v), cache, mask=Mask.from_segments(seg, causal=True))
    for row in range(b):
      out[row, fed[row]:fed[row] + counts[row]] = np.asarray(o[row, :counts[row]])
    fed += counts
    np.testing.assert_array_equal(cache['length'], fed)
  return out, fed


def test_prefill_and_steps_equal_one_causal_call():
  """Rows with prompts of 5 and 3 positions (one padded), a chunk of 3 (one row padded), then
  single steps; grouped-query heads (K=2 < N=4)."""
  b, length, n, kh, h = 2, 12, 4, 2, 8
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, length, heads, h)), jnp.float32)
             for heads in (n, kh, kh))
  reference = dense.attend(q, k, v, mask=Mask(causal=True))
  schedule = [(5, 3), (3, 2)] + [(1, 1)] * 4
  cache = dense.init_cache(b, 16, num_kv_heads=kh, head_dim=h, dtype=jnp.float32)
  out, fed = _decode(jax.jit(dense.attend_step), cache, q, k, v, schedule)
  for row in range(b):
    np.testing.assert_allclose(out[row, :fed[row]], reference[row, :fed[row]], rtol=1e-5,
                               atol=1e-5)


def test_padding_is_neither_written_nor_counted():
  cache = dense.init_cache(1, 4, num_kv_heads=1, head_dim=2, dtype=jnp.float32)
  x = jnp.ones((1, 3, 1, 2))
  seg = jnp.asarray([[1, 0, 0]])
  _, cache = dense.attend_step(x, x, x, cache, mask=Mask.from_segments(seg, causal=True))
  assert int(cache['length'][0]) == 1
  np.testing.assert_array_equal(cache['k'][0, 1:], 0.0)


def test_registry_decode():
  assert 'dense' in attention.names(decode=True)
  assert 'linformer' not in attention.names(decode=True)
  with pytest.raises(errors.Error, match="'linformer' cannot decode.*not causal"):
    attention.get('linformer').bind_step()
  with pytest.raises(errors.KeywordError, match='window'):
    attention.get('dense').bind_step(window=3)
  with pytest.raises(errors.KeywordError, match='window'):
    attention.get('dense').make_cache(1, 4, num_kv_heads=1, head_dim=2, dtype=jnp.float32,
                                      window=3)
  # mem_len reaches init_cache only if it declares it (dense does not).
  cache = attention.get('dense').make_cache(2, 4, num_kv_heads=1, head_dim=2, dtype=jnp.float32,
                                            mem_len=8)
  assert cache['k'].shape == (2, 4, 1, 2)


def test_step_keywords_must_match_attend():
  def step(q, k, v, cache, *, mask, scale=0.5):
    return q, cache
  with pytest.raises(errors.Error, match='must match'):
    Family('bad', dense.attend, init_cache=dense.init_cache, attend_step=step)
  with pytest.raises(errors.Error, match='together'):
    Family('bad', dense.attend, attend_step=dense.attend_step)
