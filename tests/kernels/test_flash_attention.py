"""The block-sparse FlashAttention kernels (interpret mode) against their XLA twins.

Every pattern runs through its family with impl='pallas' and impl='xla'; values and gradients (of a
random-cotangent weighted sum, w.r.t. q, k, v) must agree. Shapes are tiny and T = 40 is not a
multiple of the tiles (16), so padding inside is exercised everywhere; K = 2 kv heads serve N = 4
query heads. The dense kernel is also checked against `dense.attend_allowed` including the
log-sum-exp and its cotangent (the merge of sparse parts differentiates through it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import attention
from efflong.attention import Mask, bigbird, dense, local, longformer, lsh, sparse
from efflong.kernels import flash_attention
from tests.attention import arrays, close, vjp

B, T, N, K, H = 2, 40, 4, 2, 8


def _segments(kind):
  """None; 'pad': row 1 ends in padding (id 0); 'packed': ids 1 then 2, row 0 ends in padding."""
  if kind is None:
    return None
  seg = np.ones((B, T), np.int32)
  if kind == 'pad':
    seg[1, T - 13:] = 0
  else:
    seg[:, T // 2:] = 2
    seg[0, T - 3:] = 0
  return jnp.asarray(seg)


def _inputs(dtype=jnp.float32, kv_heads=K, seed=0):
  q, k, v, dout = arrays((B, T, N, H), (B, T, kv_heads, H), (B, T, kv_heads, H), (B, T, N, H),
                         seed=seed)
  return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), dout.astype(dtype)


CASES = {
    'local': (local.attend, dict(window=5, block=16), True, 'packed'),
    'local-dilated': (local.attend, dict(window=3, dilation=2, block=16), False, 'pad'),
    'local-per-head': (local.attend, dict(window=3, dilation=(1, 2, 1, 3), block=16), True, None),
    'strided': (sparse.strided, dict(stride=6, block=16), True, 'packed'),
    'fixed': (sparse.fixed, dict(block=8, summary=2), False, 'pad'),
    'fixed-factorized': (sparse.fixed, dict(block=8, summary=1, factorized=True), True, None),
    'longformer-global': (longformer.attend, dict(window=4, global_tokens=3, block=16,
                                                  separate_global=False), False, 'pad'),
    'bigbird': (bigbird.attend, dict(window=1, random_blocks=1, global_tokens=2, block=16), True,
                'packed'),
    'lsh': (lsh.attend, dict(n_hashes=2, bucket_size=8, rng=jax.random.key(3)), True, 'packed'),
    'lsh-bidirectional': (lsh.attend, dict(n_hashes=1, bucket_size=16, rng=jax.random.key(4)),
                          False, 'pad'),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_family_kernel_equals_xla(name):
  fn, kw, causal, seg = CASES[name]
  mask = Mask.from_segments(_segments(seg), causal=causal)
  (q, k, v), dout = _inputs(kv_heads=N if fn is lsh.attend else K)
  if fn is lsh.attend:
    k = q  # shared QK
  got, got_grads = vjp(functools.partial(fn, mask=mask, impl='pallas', **kw), (q, k, v), dout)
  want, want_grads = vjp(functools.partial(fn, mask=mask, impl='xla', **kw), (q, k, v), dout)
  close(got, want, f'{name} out')
  for what, g, w in zip('qkv', got_grads, want_grads):
    close(g, w, f'{name} d{what}')


@pytest.mark.parametrize('causal,seg,kv_len', [(False, 'packed', T), (True, 'pad', T),
                                                (True, None, T + 24)])
def test_dense_kernel_equals_reference_with_lse(causal, seg, kv_len):
  """Full attention, its lse and both cotangents; causal with T < S aligns queries at the end."""
  (q, _, _), dout = _inputs()
  _, k, v = arrays((1,), (B, kv_len, K, H), (B, kv_len, K, H), seed=1)
  ids = _segments(seg)
  mask = Mask(causal=causal, q_segment_ids=ids, kv_segment_ids=ids)
  dlse, = arrays((B, T, N), seed=2)
  reference = lambda q, k, v: dense.attend_allowed(q, k, v, mask.materialize(T, kv_len)[:, None],
                                                   H ** -0.5)
  kernel = lambda q, k, v: flash_attention.attend(q, k, v, mask=mask, scale=H ** -0.5, block=16)
  got, got_grads = vjp(kernel, (q, k, v), (dout, dlse))
  want, want_grads = vjp(reference, (q, k, v), (dout, dlse))
  close(got[0], want[0], 'out')
  close(got[1], want[1], 'lse')
  for what, g, w in zip('qkv', got_grads, want_grads):
    close(g, w, f'd{what}')


def test_bfloat16_inputs_accumulate_in_float32():
  """bf16 q, k, v through the kernels against the float32 reference: bf16 rounding only."""
  (q, k, v), dout = _inputs(jnp.bfloat16)
  mask = Mask.from_segments(_segments('packed'), causal=True)
  f32 = lambda *x: [y.astype(jnp.float32) for y in x]
  got, got_grads = vjp(functools.partial(local.attend, mask=mask, window=5, block=16,
                                         impl='pallas'), (q, k, v), dout)
  want, want_grads = vjp(functools.partial(local.attend, mask=mask, window=5, block=16),
                         tuple(f32(q, k, v)), dout.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16 and got_grads[0].dtype == jnp.bfloat16
  close(got, want, 'out', rtol=2e-2)
  for what, g, w in zip('qkv', got_grads, want_grads):
    close(g, w, f'd{what}', rtol=3e-2)


def test_fully_masked_tiles_are_not_visited():
  """A causal dense layout lists only the tiles up to the diagonal; the transposed layout of the
  dk/dv kernel lists, per key tile, exactly the query tiles visiting it."""
  blocks, flags, count = flash_attention.dense_layout(40, 40, causal=True, block=16)
  assert count.tolist() == [[1, 2, 3]]
  spec = flash_attention.Spec(16, blocks, flags, count, None, True, 40, 40, 1.0)
  t_blocks, _, t_count = spec.transposed
  assert t_count.tolist() == [[3, 2, 1]]
  assert t_blocks[0, 0, :3].tolist() == [0, 1, 2]
  # T < S (a cache of 24 earlier keys): the first query tile reaches key tile (24 + 15) // 16.
  assert flash_attention.dense_layout(16, 40, causal=True, block=16)[2].tolist() == [[3]]


def test_rows_that_see_nothing_are_zero_with_finite_gradients():
  (q, k, v), dout = _inputs()
  ids = jnp.zeros((B, T), jnp.int32).at[:, :8].set(1)
  mask = Mask(causal=False, q_segment_ids=jnp.full((B, T), 3), kv_segment_ids=ids)
  out, grads = vjp(functools.partial(dense.attend, mask=mask, impl='pallas'), (q, k, v), dout)
  assert not np.any(np.asarray(out))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def _spec(c=16, nq=3):
  blocks, flags, count = flash_attention.dense_layout(nq * c, nq * c, causal=False, block=c)
  return flash_attention.Spec(c, blocks, flags, count, None, False, nq * c, nq * c, 1.0)


@pytest.mark.parametrize('dtype,kv_heads,length,match', [
    (jnp.float16, K, 48, 'float32 or bfloat16'),
    (jnp.float32, 3, 48, 'K=3 must divide query heads N=4'),
    (jnp.float32, K, 40, r'layout \[1, 3, 3\] x block 16 does not fit'),
])
def test_bad_input_is_one_line(dtype, kv_heads, length, match):
  q = jnp.zeros((1, length, N, H), dtype)
  k = jnp.zeros((1, 48, kv_heads, H), dtype)
  pos = jnp.arange(48)[None, None]
  with pytest.raises(ValueError, match=match) as err:
    flash_attention.attend_slots(q, k, k, spec=_spec(), q_pos=pos[..., :length], k_pos=pos)
  assert '\n' not in str(err.value)


def test_impl_is_chosen_by_the_registry():
  """'auto' is XLA off the GPU; 'pallas' on a family without a kernel is refused; bad values too."""
  local_fam = attention.get('local')
  assert local_fam.pallas and not attention.get('linformer').pallas
  assert local_fam.bind(causal=True, window=4, impl='auto').keywords['impl'] == 'xla'
  assert local_fam.bind(causal=True, window=4, impl='pallas').keywords['impl'] == 'pallas'
  with pytest.raises(ValueError, match="'linformer' has no Pallas path"):
    attention.get('linformer').bind(causal=False, impl='pallas', k=4)
  with pytest.raises(ValueError, match="impl='triton' \\(config.model.attention_impl\\); valid"):
    local_fam.bind(causal=True, window=4, impl='triton')
