"""Cached decoding of local and longformer attention: a prefill, then one position at a time,
equals the family's causal `attend` over each row's whole sequence at every real position; the
cache is a ring of the last window * dilation keys (plus longformer's global tokens), whatever
max_len.

`replay` (tests.attention.replay on SCHEDULE; shared with test_decode_sparse) feeds the rows call
by call, right-padding each call with loud noise that must reach neither a real output nor the
cache.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflong import attention, errors
from efflong.attention import Mask, local, longformer
import tests.attention as attention_tests
from tests.attention import arrays, close

B, N, KH, H = 2, 4, 2, 4
L = 30  # Positions per sequence: more than 3 rings of the widest window below (3 * 9).
# Row 0: a 13-position prompt (more than a ring), row 1: 1 position; then single positions, with
# row 0 idle once. Real positions per row: 30 and 17.
SCHEDULE = [(13, 1)] + [(1, 1)] * 8 + [(0, 1)] + [(1, 1)] * 7 + [(1, 0)] * 2
LENGTHS = np.sum(SCHEDULE, axis=0)


replay = functools.partial(attention_tests.replay, schedule=SCHEDULE)


def reference(attend, sequences, lengths):
  """attend(*sequences, mask=) over the whole sequences (jitted: one compilation is cheaper than
  running it op by op), causal, each row right-padded after its length."""
  seg = jnp.asarray(np.arange(sequences[0].shape[1])[None] < np.asarray(lengths)[:, None],
                    jnp.int32)
  return jax.jit(lambda *x: attend(*x, mask=Mask.from_segments(seg, causal=True)))(*sequences)


def check_rows(got, want, what, lengths=LENGTHS):
  for row, n in enumerate(lengths):
    close(got[row, :n], np.asarray(want)[row, :n], f'{what}, row {row}')


def qkv(seed, length=L):
  return arrays((B, length, N, H), (B, length, KH, H), (B, length, KH, H), seed=seed)


@pytest.mark.parametrize('dilation', [2, (1, 2, 3, 2)])
def test_local_decodes_like_attend(dilation):
  """Window 3, a shared or per-head dilation, grouped-query heads (K=2 < N=4)."""
  kw = dict(window=3, dilation=dilation)
  sequences = qkv(0)
  want = reference(lambda q, k, v, mask: local.attend(q, k, v, mask=mask, **kw), sequences,
                   LENGTHS)
  step = jax.jit(lambda q, k, v, cache, seg: local.attend_step(
      q, k, v, cache, mask=Mask.from_segments(seg, causal=True), **kw))
  cache = local.init_cache(B, L, num_kv_heads=KH, head_dim=H, dtype=jnp.float32, **kw)
  got, cache = replay(step, cache, sequences)
  check_rows(got, want, f'local dilation={dilation}')


@pytest.mark.parametrize('separate_global,dilation', [(True, 2), (False, 1)])
def test_longformer_decodes_like_attend(separate_global, dilation):
  """Two global tokens (the first two positions: row 1's second one arrives in a single step),
  the window ring, and the global projections when separate."""
  kw = dict(window=3, dilation=dilation, global_tokens=2, separate_global=separate_global)
  q, k, v, qg, kg, vg = qkv(1) + qkv(2)
  want = reference(lambda *x, mask: longformer.attend(*x[:3], mask=mask, global_qkv=x[3:], **kw),
                   (q, k, v, qg, kg, vg), LENGTHS)
  step = jax.jit(lambda q, k, v, qg, kg, vg, cache, seg: longformer.attend_step(
      q, k, v, cache, mask=Mask.from_segments(seg, causal=True), global_qkv=(qg, kg, vg), **kw))
  cache = longformer.init_cache(B, L, num_kv_heads=KH, head_dim=H, dtype=jnp.float32, **kw)
  got, cache = replay(step, cache, (q, k, v, qg, kg, vg))
  check_rows(got, want, f'longformer separate_global={separate_global}')


def test_cache_size_is_flat_in_max_len():
  """The ring holds window * max(dilation) positions; longformer adds G global slots."""
  for max_len in (64, 65536):
    shapes = jax.eval_shape(lambda: local.init_cache(
        B, max_len, num_kv_heads=KH, head_dim=H, dtype=jnp.float32, window=3, dilation=(1, 4)))
    assert {n: x.shape for n, x in shapes.items()} == {
        'k': (B, 12, KH, H), 'v': (B, 12, KH, H), 'length': (B,)}
    shapes = jax.eval_shape(lambda: longformer.init_cache(
        B, max_len, num_kv_heads=KH, head_dim=H, dtype=jnp.float32, window=3, global_tokens=2))
    slots = (B, 2, KH, H)
    assert {n: x.shape for n, x in shapes.items()} == {
        'k': (B, 3, KH, H), 'v': (B, 3, KH, H), 'length': (B,), 'global_k': slots,
        'global_v': slots, 'global_kg': slots, 'global_vg': slots}


def test_refused_settings():
  """Global token flags (they would need the whole context cached), a non-causal mask."""
  q, k, v = qkv(3, length=4)
  kw = dict(window=2, global_tokens=1, separate_global=False)
  cache = longformer.init_cache(B, 8, num_kv_heads=KH, head_dim=H, dtype=jnp.float32, **kw)
  flags = Mask(causal=True, global_tokens=jnp.zeros((B, 4), bool).at[:, 2].set(True))
  with pytest.raises(errors.Error, match='not per-example flags.*whole context'):
    longformer.attend_step(q, k, v, cache, mask=flags, **kw)
  with pytest.raises(errors.Error, match='causal'):
    longformer.attend_step(q, k, v, cache, mask=Mask(), **kw)
  with pytest.raises(errors.Error, match='no global tokens'):
    local.attend_step(q, k, v, cache, mask=flags, window=2)


def test_registry_wires_them():
  for name in ('local', 'longformer'):
    assert name in attention.names(decode=True)
  cache = attention.get('local').make_cache(B, 64, num_kv_heads=KH, head_dim=H,
                                            dtype=jnp.float32, window=5, block=16)
  assert cache['k'].shape == (B, 5, KH, H)
  with pytest.raises(errors.Error, match='needs.*window'):
    attention.get('longformer').bind_step()
