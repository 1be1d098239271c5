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

from efflong import attention, kernels
from efflong.attention import Mask, bigbird, blocksparse, dense, local, longformer, lsh, sparse
from efflong.kernels import flash_attention
from efflong.mask import NEG_INF
from tests.attention import arrays, close, vjp
from tests.helpers import segments

B, T, N, K, H = 2, 40, 4, 2, 8


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
    'longformer-flags': (longformer.attend, dict(window=4, global_tokens=3, block=16,
                                                 separate_global=False), True, 'packed+flags'),
    'strided-bidirectional': (sparse.strided, dict(stride=5, block=16), False, 'pad'),
    'bigbird-bidirectional': (bigbird.attend, dict(window=1, random_blocks=1, block=16), False,
                              None),
    'bigbird': (bigbird.attend, dict(window=1, random_blocks=1, global_tokens=2, block=16), True,
                'packed'),
    # LSH: the causal band with its bucket ids (the -log N_ij count has no kernel: duplicates on).
    'lsh': (lsh.attend, dict(n_hashes=2, bucket_size=8, allow_duplicates=True,
                             rng=jax.random.key(3)), True, 'packed'),
    'lsh-chunked-across-buckets': (lsh.attend, dict(
        n_hashes=2, bucket_size=8, allow_duplicates=True, attend_across_buckets=True,
        causal_band=False, rng=jax.random.key(5)), True, 'packed'),
    'lsh-bidirectional': (lsh.attend, dict(n_hashes=1, bucket_size=16, rng=jax.random.key(4)),
                          False, 'pad'),
}


def _mask(causal, seg):
  """seg: a kind for segments(), '+flags': also per-example global tokens (two per row)."""
  kind, _, flags = (seg or '').partition('+')
  tokens = jnp.zeros((B, T), bool).at[0, [3, 30]].set(True).at[1, [0, 17]].set(True)
  return Mask.from_segments(segments(kind or None, B, T), causal=causal,
                            global_tokens=tokens if flags else None)


@pytest.mark.parametrize('name', sorted(CASES))
def test_family_kernel_equals_xla(name):
  fn, kw, causal, seg = CASES[name]
  mask = _mask(causal, seg)
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
  ids = segments(seg, B, T)
  mask = Mask(causal=causal, q_segment_ids=ids, kv_segment_ids=ids)
  dlse, = arrays((B, T, N), seed=2)
  reference = lambda q, k, v: dense.attend_allowed(q, k, v, mask.materialize(T, kv_len)[:, None],
                                                   H ** -0.5)
  kernel = functools.partial(_dense_kernel, mask=mask)
  got, got_grads = vjp(kernel, (q, k, v), (dout, dlse))
  want, want_grads = vjp(reference, (q, k, v), (dout, dlse))
  close(got[0], want[0], 'out')
  close(got[1], want[1], 'lse')
  for what, g, w in zip('qkv', got_grads, want_grads):
    close(g, w, f'd{what}')


@pytest.mark.parametrize('name', ['dense', 'local', 'lsh'])
def test_bfloat16_inputs_accumulate_in_float32(name):
  """bf16 q, k, v through the kernels against the float32 XLA twin: bf16 rounding only."""
  fn, kw = {'dense': (dense.attend, {}), 'local': (local.attend, dict(window=5, block=16)),
            'lsh': CASES['lsh'][:2]}[name]
  (q, k, v), dout = _inputs(jnp.bfloat16, kv_heads=N if name == 'lsh' else K)
  k = q if name == 'lsh' else k
  mask = Mask.from_segments(segments('packed', B, T), causal=True)
  f32 = lambda *x: [y.astype(jnp.float32) for y in x]
  got, got_grads = vjp(functools.partial(fn, mask=mask, impl='pallas', **kw), (q, k, v), dout)
  want, want_grads = vjp(functools.partial(fn, mask=mask, **kw), tuple(f32(q, k, v)),
                         dout.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16 and got_grads[0].dtype == jnp.bfloat16
  close(got, want, 'out', rtol=2e-2)
  for what, g, w in zip('qkv', got_grads, want_grads):
    close(g, w, f'd{what}', rtol=3e-2)


def _dense_kernel(q, k, v, *, mask):
  """Full attention through the kernels in tiles of 16: (out, lse)."""
  layout = blocksparse.dense_layout(q.shape[1], k.shape[1], causal=mask.causal, block=16)
  return blocksparse.attend_layout(q, k, v, mask=mask, layout=layout, scale=H ** -0.5,
                                   impl='pallas')


def _compact(layout):
  return flash_attention.compact(layout.kv_blocks, layout.kind != blocksparse.EMPTY,
                                 layout.kind == blocksparse.PATTERN)


def test_causal_layouts_list_only_the_tiles_up_to_the_diagonal():
  """A causal dense layout lists only the tiles up to the diagonal; the transposed layout of the
  dk/dv kernel lists, per key tile, exactly the query tiles visiting it."""
  blocks, flags, count = _compact(blocksparse.dense_layout(40, 40, causal=True, block=16))
  assert count.tolist() == [[1, 2, 3]]
  spec = flash_attention.Spec(16, blocks, flags, count, None, True, 40, 40, 1.0, True)
  t_blocks, _, t_count = spec.transposed
  assert t_count.tolist() == [[3, 2, 1]]
  assert t_blocks[0, 0, :3].tolist() == [0, 1, 2]
  # T < S (a cache of 24 earlier keys): the first query tile reaches key tile (24 + 15) // 16.
  assert _compact(blocksparse.dense_layout(16, 40, causal=True, block=16))[2].tolist() == [[3]]


def test_rows_that_see_nothing_are_zero_beside_rows_that_see_keys():
  """Query rows whose segment has no key (id 3) get zeros and NEG_INF, and pass no gradient;
  the other rows, in the same tiles, match the reference (lse compared on them only)."""
  (q, k, v), dout = _inputs()
  q_ids = jnp.ones((B, T), jnp.int32).at[:, 5:12].set(3).at[1, 30:].set(3)
  mask = Mask(causal=False, q_segment_ids=q_ids, kv_segment_ids=segments('packed', B, T))
  dlse, = arrays((B, T, N), seed=2)
  reference = lambda q, k, v: dense.attend_allowed(q, k, v, mask.materialize(T, T)[:, None],
                                                   H ** -0.5)
  kernel = functools.partial(_dense_kernel, mask=mask)
  (out, lse), grads = vjp(kernel, (q, k, v), (dout, dlse))
  (want, want_lse), want_grads = vjp(reference, (q, k, v), (dout, dlse))
  blind = np.asarray(q_ids == 3)
  assert not np.any(np.asarray(out)[blind]) and np.all(np.asarray(lse)[blind] == NEG_INF)
  assert not np.any(np.asarray(grads[0])[blind])
  close(out, want, 'out')
  close(np.asarray(lse)[~blind], np.asarray(want_lse)[~blind], 'lse')
  for what, g, w in zip('qkv', grads, want_grads):
    close(g, w, f'd{what}')


def _spec(c=16, nq=3):
  blocks, flags, count = _compact(blocksparse.dense_layout(nq * c, nq * c, causal=False, block=c))
  return flash_attention.Spec(c, blocks, flags, count, None, False, nq * c, nq * c, 1.0, True)


BAD = {  # case -> (overrides of the good call's arguments, the error's text)
    'float16': (dict(dtype=jnp.float16), 'float32 or bfloat16'),
    'K does not divide N': (dict(kv_heads=3),
                            r'K=3 must divide query heads N=4; valid K: \[1, 2, 4\]'),
    'k head dim': (dict(k_head_dim=4), r'k and v must be \[B=1, S, K, H=8\]'),
    'layout vs q': (dict(length=40), r'layout \[L=1, 3, 3\] x block 16 does not fit .* T = 48'),
    'positions': (dict(q_pos_len=40),
                  r'q_pos has shape \(1, 1, 40\); expected \[1 or 1, 1 or 4, 48\]'),
    'one segment array': (dict(q_seg=True), 'both q_seg and k_seg, or neither'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_is_one_line(case):
  kw, match = BAD[case]
  length = kw.get('length', 48)
  q = jnp.zeros((1, length, N, H), kw.get('dtype', jnp.float32))
  k = jnp.zeros((1, 48, kw.get('kv_heads', K), kw.get('k_head_dim', H)), q.dtype)
  pos = jnp.arange(48)[None, None]
  segs = dict(q_seg=pos) if kw.get('q_seg') else {}
  with pytest.raises(ValueError, match=match) as err:
    flash_attention.attend_slots(q, k, k, spec=_spec(), k_pos=pos, **segs,
                                 q_pos=pos[..., :kw.get('q_pos_len', length)])
  assert '\n' not in str(err.value)


def test_bad_dtype_through_a_family():
  (q, k, v), _ = _inputs(jnp.float16)
  with pytest.raises(ValueError, match='float32 or bfloat16 q, k, v of one dtype; got float16'):
    local.attend(q, k, v, mask=Mask(causal=True), window=4, block=16, impl='pallas')


def test_impl_is_chosen_by_the_registry(monkeypatch):
  """'auto' is Pallas on the GPU where the tile suits Triton, else XLA; 'pallas' on a family
  without a kernel is refused; bad values too."""
  local_fam = attention.get('local')
  assert local_fam.pallas and not attention.get('linformer').pallas
  assert local_fam.bind(causal=True, window=4, impl='auto').keywords['impl'] == 'auto'
  for backend, tile, want in (('cpu', 16, 'xla'), ('gpu', 16, 'pallas'), ('gpu', 24, 'xla'),
                              ('gpu', 8, 'xla')):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert kernels.resolve('auto', tile=tile) == want, (backend, tile)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  with pytest.raises(ValueError, match="'pallas' is not available on TPU"):
    local_fam.bind(causal=True, window=4, impl='pallas')
  monkeypatch.undo()
  with pytest.raises(ValueError, match="'linformer' has no Pallas path"):
    attention.get('linformer').bind(causal=False, impl='pallas', k=4)
  with pytest.raises(ValueError, match="impl='triton' \\(config.model.attention_impl\\); valid"):
    local_fam.bind(causal=True, window=4, impl='triton')

