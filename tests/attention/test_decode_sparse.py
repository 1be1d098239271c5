"""Cached decoding of the strided, fixed and bigbird patterns: a prefill, then one position at a
time, equals the family's causal `attend` over each row's whole sequence at every real position
(the schedule and the replay of test_decode_local); a step gathers only the keys its pattern can
allow (O(l + S_max / l) for strided), never a row of the whole cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import attention, errors
from efflong.attention import Mask, bigbird, dense, sparse
from tests.attention.test_decode_local import B, H, KH, L, LENGTHS, N, check_rows, qkv, reference, replay


def _decode_matches(name, attend, step_fn, data_seed, **kw):
  """replay of step_fn over a full cache of L positions equals attend over the sequences."""
  sequences = qkv(data_seed)
  want = reference(lambda q, k, v, mask: attend(q, k, v, mask=mask, **kw), sequences, LENGTHS)
  step = jax.jit(lambda q, k, v, cache, seg: step_fn(
      q, k, v, cache, mask=Mask.from_segments(seg, causal=True), **kw))
  cache = dense.init_cache(B, L, num_kv_heads=KH, head_dim=H, dtype=jnp.float32)
  got, _ = replay(step, cache, sequences)
  check_rows(got, want, f'{name} {kw}')


@pytest.mark.parametrize('name,kw', [
    ('strided', dict(stride=4)),
    ('strided', dict(stride=3, factorized=True)),
    ('fixed', dict(block=5, summary=2)),
    ('fixed', dict(block=4, summary=1, factorized=True)),
])
def test_strided_and_fixed_decode_like_attend(name, kw):
  """Grouped-query heads (K=2 < N=4); factorized: each half of the heads sees one part."""
  attend, step = {'strided': (sparse.strided, sparse.strided_step),
                  'fixed': (sparse.fixed, sparse.fixed_step)}[name]
  _decode_matches(name, attend, step, 0, **kw)


def test_bigbird_decodes_like_attend():
  """Window, two random blocks per head and query block (layer 1's draw, at T = S_max = L, which
  is not a multiple of the block), two global tokens (row 1's second arrives in a single step)."""
  _decode_matches('bigbird', bigbird.attend, bigbird.attend_step, 1, block=4, window=1,
                  random_blocks=2, global_tokens=2, seed=3, layer=1)


def test_bigbird_layout_depends_on_length():
  """Why decoding draws the layout at S_max: past head 0, the causal random blocks of a query
  block change with T (the heads share one generator), so only T = S_max is the parallel twin."""
  kw = dict(heads=2, block=4, window=1, random_blocks=2, causal=True, seed=0, layer=0)
  short, full = (bigbird.random_layout(t, **kw).kv_blocks for t in (32, 64))
  visits = short.shape[2]
  np.testing.assert_array_equal(short[0], full[0, :8, :visits])
  assert not np.array_equal(short[1], full[1, :8, :visits])


def _dot_shapes(jaxpr):
  """The operand shapes of every dot_general in a jaxpr and the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield [x.aval.shape for x in eqn.invars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _dot_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _dot_shapes(sub)


def test_strided_step_reads_only_its_pattern():
  """With S_max = 4096 and l = 64, a step's logits and values run over M = 64 + 4095 // 64 = 127
  gathered keys per query, not over the cache."""
  s, stride = 4096, 64
  x, band, column = sparse.strided_candidates(jnp.asarray([[0], [4000]]), stride=stride,
                                              max_len=s)
  m = stride + (s - 1) // stride
  assert x.shape == band.shape == column.shape == (2, 1, 1, m)
  assert set(np.asarray(x[1, 0, 0, stride:]) % stride) == {4000 % stride}
  q, k, v = (jnp.zeros((B, 1, heads, H)) for heads in (N, KH, KH))
  cache = jax.eval_shape(lambda: dense.init_cache(B, s, num_kv_heads=KH, head_dim=H,
                                                  dtype=jnp.float32))
  jaxpr = jax.make_jaxpr(lambda c: sparse.strided_step(q, k, v, c, mask=Mask(causal=True),
                                                       stride=stride))(cache)
  shapes = list(_dot_shapes(jaxpr.jaxpr))
  assert len(shapes) == 2 and all(shape[1] == (B, 1, m, KH, H) for shape in shapes), shapes


def test_refused_settings():
  q, k, v = qkv(3, length=4)
  cache = dense.init_cache(B, 8, num_kv_heads=KH, head_dim=H, dtype=jnp.float32)
  flags = Mask(causal=True, global_tokens=jnp.ones((B, 4), bool))
  with pytest.raises(errors.Error, match='not per-example flags'):
    bigbird.attend_step(q, k, v, cache, mask=flags, block=2, global_tokens=4)
  with pytest.raises(errors.Error, match='no global tokens'):
    sparse.strided_step(q, k, v, cache, mask=flags, stride=2)
  with pytest.raises(errors.Error, match='causal'):
    sparse.fixed_step(q, k, v, cache, mask=Mask(), block=2)
  with pytest.raises(errors.Error, match='odd'):
    sparse.strided_step(q[:, :, :3], k[:, :, :1], v[:, :, :1], cache, mask=Mask(causal=True),
                        stride=2, factorized=True)


def test_registry_wires_them():
  for name in ('strided', 'fixed', 'bigbird'):
    assert name in attention.names(decode=True)
  step = attention.get('strided').bind_step(stride=2)
  cache = attention.get('strided').make_cache(B, 8, num_kv_heads=KH, head_dim=H,
                                              dtype=jnp.float32, stride=2)
  _, cache = step(*qkv(4, length=3), cache, mask=Mask(causal=True))
  np.testing.assert_array_equal(cache['length'], 3)
