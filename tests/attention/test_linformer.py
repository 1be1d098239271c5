"""Linformer: the identity limit, a direct per-segment evaluation, leak probes and its errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import attention, errors
from efflong.attention import Mask, dense, linformer
from tests.attention import arrays, close, vjp

H = 4


@pytest.mark.parametrize('heads', ['shared', 'per_kv_head'])
def test_identity_projections_with_k_equal_T_are_dense_attention(heads):
  """k = T and E = F = I: the projected keys are the keys (values and gradients)."""
  b, t, n, kh = 2, 9, 4, 2
  q, k, v, dout = arrays((b, t, n, H), (b, t, kh, H), (b, t, kh, H), (b, t, n, H))
  eye = jnp.eye(t)[None].repeat(1 if heads == 'shared' else kh, axis=0)
  fn = lambda q, k, v: linformer.attend(q, k, v, mask=Mask(causal=False), proj_k=eye, proj_v=eye)
  ref = lambda q, k, v: dense.attend(q, k, v, mask=Mask(causal=False))
  (out, grads), (want, wgrads) = vjp(fn, (q, k, v), dout), vjp(ref, (q, k, v), dout)
  close(out, want, 'out')
  for got, exp, what in zip(grads, wgrads, 'qkv'):
    close(got, exp, f'd{what}')


def direct(q, k, v, seg, e, f):
  """Per example and segment g: softmax(q (E_S (k [seg = g]))^T / sqrt(H)) F_S (v [seg = g]).

  q [B, T, N, H]; k, v [B, S, K, H]; seg [B, S] or None; e, f [K|1, P, T_max] (first S columns).
  """
  b, t, n, _ = q.shape
  s, kh = k.shape[1:3]
  e = jnp.broadcast_to(e[..., :s], (kh, *e.shape[1:2], s))
  f = jnp.broadcast_to(f[..., :s], (kh, *f.shape[1:2], s))
  k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
  e, f = jnp.repeat(e, n // kh, axis=0), jnp.repeat(f, n // kh, axis=0)
  seg = np.ones((b, s), np.int32) if seg is None else np.asarray(seg)
  out = jnp.zeros(q.shape)
  for g in range(1, int(seg.max()) + 1):
    member = (seg == g)[:, :, None, None]
    kp = jnp.einsum('NPS,BSNH->BPNH', e, jnp.where(member, k, 0.0))
    vp = jnp.einsum('NPS,BSNH->BPNH', f, jnp.where(member, v, 0.0))
    probs = jax.nn.softmax(jnp.einsum('BTNH,BPNH->BNTP', q, kp) * H ** -0.5, axis=-1)
    out_g = jnp.einsum('BNTP,BPNH->BTNH', probs, vp)
    out = jnp.where((seg[:, :t] == g)[:, :, None, None], out_g, out)
  return out


CASES = {
    # name: (B, T, N, K, T_max, P, segments (None / 'pad' / 'packed'), share_heads)
    'plain_shorter_than_max_len': (2, 7, 2, 2, 11, 3, None, False),
    'padded_gqa_per_kv_head': (2, 10, 4, 2, 10, 4, 'pad', False),
    'packed_mqa_headwise': (2, 12, 4, 1, 16, 5, 'packed', True),
}


@pytest.mark.parametrize('name', list(CASES))
def test_equals_a_direct_per_segment_evaluation(name):
  b, t, n, kh, t_max, p, segs, shared = CASES[name]
  q, k, v, dout = arrays((b, t, n, H), (b, t, kh, H), (b, t, kh, H), (b, t, n, H))
  e, f = arrays(*[(1 if shared else kh, p, t_max)] * 2, seed=1)
  seg = None
  if segs:
    seg = np.ones((b, t), np.int32)
    seg[0, t - 3:] = 0
    if segs == 'packed':
      seg[:, t // 2:] = 2
      seg[1, t - 2:] = 0
    seg = jnp.asarray(seg)
  mask = Mask.from_segments(seg, causal=False)
  fn = lambda q, k, v: linformer.attend(q, k, v, mask=mask, proj_k=e, proj_v=f,
                                        segments=2 if segs == 'packed' else 1)
  ref = lambda q, k, v: direct(q, k, v, seg, e, f)
  # Pad queries get zeros here and are left out of the reference (and of the cotangent).
  real = jnp.ones((b, t, 1, 1)) if seg is None else (seg > 0)[:, :, None, None].astype(jnp.float32)
  (out, grads), (want, wgrads) = (vjp(fn, (q, k, v), dout * real),
                                  vjp(ref, (q, k, v), dout * real))
  close(out * real, want, 'out')
  np.testing.assert_array_equal(np.asarray(out * (1 - real)), 0.0)
  for got, exp, what in zip(grads, wgrads, 'qkv'):
    close(got, exp, f'd{what}')


def test_pads_and_other_sequences_never_reach_a_real_token():
  """Changing the pad tokens, or the other packed sequence, moves no output of a sequence."""
  b, t, n, kh, p = 1, 12, 2, 2, 4
  q, k, v = arrays((b, t, n, H), (b, t, kh, H), (b, t, kh, H))
  e, f = arrays((kh, p, t), (kh, p, t), seed=2)
  seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2])
  attend = jax.jit(functools.partial(linformer.attend, mask=Mask.from_segments(seg, causal=False),
                                     proj_k=e, proj_v=f, segments=2))
  base = np.asarray(attend(q, k, v))
  moved = lambda changed: np.abs(np.asarray(attend(q, k.at[:, changed].add(3.0),
                                                   v.at[:, changed].add(3.0))) - base)
  pads, first, second = slice(10, 12), slice(0, 5), slice(5, 10)
  assert moved(pads)[:, :10].max() < 1e-6
  assert moved(second)[:, first].max() < 1e-6 and moved(second)[:, second].max() > 1e-2
  assert moved(first)[:, second].max() < 1e-6 and moved(first)[:, first].max() > 1e-2


def _modules(share, layers=2):
  """The linformer modules of `layers` layers of one stack (k = 3, max_len = 10, 2 kv heads)."""
  rngs, stack_modules = nnx.Rngs(0), {}
  return [attention.get('linformer').make_module(
      {'k': 3, 'share': share}, d_model=8, num_heads=2, num_kv_heads=2, head_dim=H, max_len=10,
      stack_modules=stack_modules, dtype=jnp.float32, rngs=rngs) for _ in range(layers)]


@pytest.mark.parametrize('share,shape,own_f,shared_across_layers', [
    ('none', (2, 3, 10), True, False),
    ('headwise', (1, 3, 10), True, False),
    ('kv', (1, 3, 10), False, False),
    ('layerwise', (1, 3, 10), False, True),
])
def test_sharing_modes(share, shape, own_f, shared_across_layers):
  first, second = _modules(share)
  proj = first(None)
  assert proj['proj_k'].shape == shape
  assert (proj['proj_k'] is proj['proj_v']) != own_f
  assert (first is second) == shared_across_layers
  params = nnx.state(nnx.List([first, second]), nnx.Param)
  want = (1 if shared_across_layers else 2) * (2 if own_f else 1)
  assert len(jax.tree.leaves(params)) == want


@pytest.mark.parametrize('kw,match', [
    ({'k': 0}, r'linformer k=0 must be an int >= 1'),
    ({'share': 'rows'}, r"linformer share='rows'; valid: \['none', 'headwise', 'kv', 'layerwise'\]"),
])
def test_bad_module_hyper_parameters(kw, match):
  with pytest.raises(ValueError, match=match):
    attention.get('linformer').make_module(
        kw, d_model=8, num_heads=2, num_kv_heads=2, head_dim=H, max_len=10, stack_modules={},
        dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_bad_inputs_get_one_clear_line():
  q, k, v = arrays((1, 6, 2, H), (1, 6, 2, H), (1, 6, 2, H))
  e = jnp.ones((1, 2, 5))
  cases = [
      (lambda: attention.get('linformer').bind(causal=True), 'does not support causal masking: its '
       'projections E K and F V mix every position'),
      (lambda: linformer.attend(q, k, v, mask=Mask(causal=False), proj_k=e, proj_v=e),
       "input length 6 exceeds the Linformer projections' max_len=5"),
      (lambda: linformer.attend(q, k, v, mask=Mask.from_segments(jnp.full((1, 6), 3), causal=False),
                                proj_k=jnp.ones((1, 2, 6)), proj_v=jnp.ones((1, 2, 6)),
                                segments=2), r'segment id 3 is outside 0..segments=2'),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match) as info:
      fn()
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('bad_id', [3, -1])
def test_a_segment_id_outside_segments_fails_loudly_under_jit(bad_id):
  """Under jit (all training) the ids are traced; an id above `segments` would be projected
  nowhere, so its queries would get zeros: the check names the id and the setting when the
  program runs, and errors.raise_pending (called by the trainer) raises it."""
  q, k, v = arrays((1, 6, 2, H), (1, 6, 2, H), (1, 6, 2, H))
  e = jnp.ones((1, 2, 6))
  attend = jax.jit(lambda q, k, v, seg: linformer.attend(
      q, k, v, mask=Mask.from_segments(seg, causal=False), proj_k=e, proj_v=e, segments=2))
  attend(q, k, v, jnp.asarray([[1, 1, 2, 2, 0, 0]]))
  errors.raise_pending()
  attend(q, k, v, jnp.asarray([[1, 1, 2, 2, bad_id, 0]]))
  with pytest.raises(errors.CheckError) as info:
    errors.raise_pending()
  assert str(info.value) == (
      f'segment id {bad_id} is outside 0..segments=2; set model.attention_kw.segments to the most '
      'sequences packed in a row.')
