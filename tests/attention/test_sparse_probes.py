"""Leak probes and input errors of the sparse families.

A probe batch holds a base row and rows that each change q, k and v at one position. In causal mode
no output before the changed position may move; with padding, no real token's output may move when a
pad changes. Each "does not move" is paired with a "does move", so a family returning zeros or
ignoring its inputs cannot pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import attention, errors
from efflong.attention import Mask, bigbird, local, longformer, sparse

B_T_N_K_H = (2, 17, 4, 2, 4)  # T = 17: no block size used below divides it.
ATOL = 1e-6
MOVED = 1e-4

FAMILIES = {
    # id: (attend, hyper-parameters)
    'local_dilated': (local.attend, dict(window=2, dilation=2, block=4)),
    'local_per_head_dilation': (local.attend, dict(window=1, dilation=(1, 3, 2, 1), block=4)),
    'longformer': (longformer.attend, dict(window=2, global_tokens=2, separate_global=False,
                                           block=4)),
    'strided': (sparse.strided, dict(stride=4, block=4)),
    'strided_factorized': (sparse.strided, dict(stride=3, factorized=True, block=4)),
    'fixed': (sparse.fixed, dict(block=4, summary=2)),
    'fixed_factorized': (sparse.fixed, dict(block=5, summary=1, factorized=True)),
    'bigbird': (bigbird.attend, dict(block=4, window=1, random_blocks=1, global_tokens=1)),
}


def probe_batch(positions, seed=0):
  """q [1 + P, T, N, H], k, v [1 + P, T, K, H]: row 0 the base, row 1 + i changed at positions[i]."""
  _, t, n, kh, h = B_T_N_K_H
  rng = np.random.default_rng(seed)
  rows = []
  for shape in ((t, n, h), (t, kh, h), (t, kh, h)):
    base = rng.standard_normal(shape).astype(np.float32)
    changed = [base] + [base.copy() for _ in positions]
    for row, p in zip(changed[1:], positions):
      row[p] = rng.standard_normal(shape[1:])
    rows.append(jnp.asarray(np.stack(changed)))
  return rows


def moved(out, i):
  """[T]: how far row 1 + i's output moved from the base row's, per position."""
  out = np.asarray(out)
  return np.abs(out[1 + i] - out[0]).max(axis=(-1, -2))


@functools.partial(jax.jit, static_argnames=('name', 'causal'))
def _run(q, k, v, segment_ids, *, name, causal):
  fn, hyper = FAMILIES[name]
  return fn(q, k, v, mask=Mask.from_segments(segment_ids, causal=causal), **hyper)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_causal_outputs_ignore_the_future(name):
  t = B_T_N_K_H[1]
  positions = (5, 10, t - 1)
  q, k, v = probe_batch(positions)
  out = _run(q, k, v, None, name=name, causal=True)
  for i, p in enumerate(positions):
    delta = moved(out, i)
    assert delta[:p].max() <= ATOL, f'changing position {p} moved output {np.argmax(delta[:p])}'
    assert delta[p] > MOVED  # The changed query itself.
    # A later query sees p (own block, window, stride or summary of every family here) when p is
    # not the last position.
    if p < t - 1:
      assert delta[p + 1:].max() > MOVED


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('name', list(FAMILIES))
def test_pads_reach_no_real_token(name, causal):
  t = B_T_N_K_H[1]
  real = 12  # Positions 12.. are padding (segment 0); two packed segments before them.
  positions = (real, t - 1, 3)
  q, k, v = probe_batch(positions, seed=1)
  seg = np.zeros((1 + len(positions), t), np.int32)
  seg[:, :6], seg[:, 6:real] = 1, 2
  out = _run(q, k, v, jnp.asarray(seg), name=name, causal=causal)
  for i, p in enumerate(positions[:2]):
    assert moved(out, i)[:real].max() <= ATOL, f'pad {p} reached a real token'
  # A real token's change reaches real outputs of its segment only.
  delta = moved(out, 2)
  assert delta[:6].max() > MOVED and delta[6:real].max() <= ATOL
  assert np.isfinite(np.asarray(out)).all()


def _qkv(t=8, n=4, kh=2):
  x = jnp.ones((1, t, n, 4))
  return x, jnp.ones((1, t, kh, 4)), jnp.ones((1, t, kh, 4))


GLOBALS_8 = jnp.zeros((1, 8), bool).at[0, 2].set(True)


@pytest.mark.parametrize('fn, hyper, mask, match', [
    (local.attend, dict(window=0), None, r'window=0 must be a positive integer'),
    (local.attend, dict(window=2, dilation=0), None, r'dilation=0 must be a positive integer'),
    (local.attend, dict(window=2, dilation=(1, 2)), None, r'dilation has 2 entries; give one per '
                                                          r'head \(N=4\)'),
    (local.attend, dict(window=2, dilation=(1, 2, 0, 1)), None, r'dilation=\(1, 2, 0, 1\) must be'),
    (local.attend, dict(window=2, block=0), None, r'block=0 must be a positive integer'),
    (local.attend, dict(window=2), Mask(global_tokens=GLOBALS_8), r'local attention has no global '
                                                                  'tokens'),
    (sparse.strided, dict(stride=0), None, r'stride=0 must be a positive integer'),
    (sparse.strided, dict(stride=-3), None, r'stride=-3 must be a positive integer'),
    (sparse.fixed, dict(block=0), None, r'block=0 must be a positive integer'),
    (sparse.fixed, dict(block=4, summary=5), None, r'summary=5 must be <= block=4'),
    (sparse.strided, dict(stride=2, factorized=True), None, None),   # N = 4: fine.
    (longformer.attend, dict(window=1, global_tokens=9, separate_global=False), None,
     r'global_tokens=9 must be an int in \[0, T=8\]'),
    (longformer.attend, dict(window=1, global_tokens=2), None, r'needs global_qkv'),
    (longformer.attend, dict(window=1, separate_global=False), Mask(global_tokens=GLOBALS_8),
     r'global_tokens=0 slots'),
    (longformer.attend, dict(window=1, global_tokens=1, separate_global=False),
     Mask(global_tokens=jnp.zeros((1, 7), bool)), r'Mask.global_tokens has shape \(1, 7\)'),
    (bigbird.attend, dict(global_tokens=8, block=2), None, None),
    (bigbird.attend, dict(global_tokens=-1, block=2), None, r'global_tokens=-1 must be an int'),
    (bigbird.attend, dict(random_blocks=-1, block=2), None, r'random_blocks=-1 must be >= 0'),
])
def test_bad_hyper_parameters_are_one_clear_line(fn, hyper, mask, match):
  q, k, v = _qkv()
  mask = Mask() if mask is None else mask
  if match is None:
    assert np.isfinite(np.asarray(fn(q, k, v, mask=mask, **hyper))).all()
    return
  with pytest.raises(ValueError, match=match) as info:
    fn(q, k, v, mask=mask, **hyper)
  assert '\n' not in str(info.value)


def test_factorized_needs_an_even_number_of_heads():
  q, k, v = _qkv(n=3, kh=1)
  with pytest.raises(ValueError, match=r'N=3 is odd'):
    sparse.strided(q, k, v, mask=Mask(), stride=2, factorized=True)


def test_sparse_families_need_self_attention():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r'T == S \(self-attention\); got T=8, S=6'):
    local.attend(q, k[:, :6], v[:, :6], mask=Mask(), window=2)


@pytest.mark.parametrize('name, missing', [('local', 'window'), ('strided', 'stride'),
                                           ('fixed', 'block'), ('longformer', 'window')])
def test_registry_asks_for_required_hyper_parameters(name, missing):
  with pytest.raises(ValueError, match=rf"attention '{name}' needs \['{missing}'\] set"):
    attention.get(name).bind(causal=True)
  with pytest.raises(ValueError, match=rf"attention '{name}' needs \['{missing}'\] set"):
    attention.get(name).bind(causal=True, **{missing: None})


@pytest.mark.parametrize('attend, kw', [
    (longformer.attend, dict(window=1, separate_global=False)),
    (bigbird.attend, dict(block=4, window=1, random_blocks=1)),
])
def test_too_many_global_flags_fail_loudly_under_jit(attend, kw):
  """A row flagging more tokens than there are global slots would lose the extra flags silently
  (only the first G are global): jitted (as in training), errors.raise_pending (called by the
  trainer) raises the check's error, naming the count."""
  q, k, v = (jnp.ones((2, 8, 2, 4)),) * 3
  fn = jax.jit(lambda flags: attend(q, k, v, mask=Mask(global_tokens=flags), global_tokens=2, **kw))
  flags = np.zeros((2, 8), bool)
  flags[1, :2] = True
  fn(flags)
  errors.raise_pending()
  flags[1, 5] = True
  fn(flags)
  with pytest.raises(errors.CheckError, match=r'^a row flags 3 global tokens; the attention has '
                     r'global_tokens=2 slots; set model.attention_kw.global_tokens to the most a '
                     r'row flags.$'):
    errors.raise_pending()
