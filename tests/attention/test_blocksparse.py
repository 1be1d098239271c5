"""How blocksparse's XLA path reads the visited key tiles, against its slow twin.

`attend_layout` reads a band's tiles as shifted views shared by every head and tiles that every
query block visits as one view (`blocksparse.reads`); views=False gathers every visited tile as
the layout lists it, per head. Both must agree to a relative error of 1e-5 in float32 (as the
families against dense in test_sparse.py), outputs, log-sum-exps and the gradients of both, for
each kind of read, with segments, GQA and an excluded key set. All cases run in one jit.
"""

import jax
import jax.numpy as jnp
import numpy as np

from efflong.attention import Mask, bigbird, blocksparse, local, sparse
from efflong.mask import NEG_INF
from tests.attention.test_sparse import _close
from tests.helpers import segments

H = 4

# name: (layout, B, T, N, K, causal, segments, exclude every third key, expected read)
CASES = {
    'band_causal_packed_gqa': (
        local.band_layout(13, 13, window=3, dilation=1, causal=True, heads=4, block=4),
        2, 13, 4, 2, True, 'packed', False, 'shift'),
    'band_per_head_dilation_bidirectional_excluded': (
        local.band_layout(22, 22, window=2, dilation=(1, 2, 3, 1), causal=False, heads=4, block=4),
        2, 22, 4, 2, False, 'pad', True, 'shift'),
    'residue_dilated_causal': (
        local.band_layout(16, 16, window=2, dilation=3, causal=True, heads=2, block=4),
        1, 16, 2, 1, True, None, False, 'shift'),
    'summary_columns_causal_packed': (
        sparse.fixed_layouts(16, block=4, summary=1, causal=True)[1],
        2, 16, 2, 2, True, 'packed', False, 'fixed'),
    'random_blocks_per_head_gqa': (
        bigbird.random_layout(16, heads=4, block=4, window=0, random_blocks=2, causal=False,
                              seed=0),
        1, 16, 4, 2, False, 'pad', True, 'gather'),
}


def _inputs(b, t, n, kh, causal, segs, exclude, seed):
  rng = np.random.default_rng(seed)
  q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                    for shape in ((b, t, n, H), (b, t, kh, H), (b, t, kh, H), (b, t, n, H)))
  d_lse = jnp.asarray(rng.standard_normal((b, t, n)), jnp.float32)
  mask = Mask.from_segments(segments(segs, b, t), causal=causal)
  skip = jnp.asarray(np.broadcast_to(np.arange(t) % 3 == 1, (b, t))) if exclude else None
  return (q, k, v), (d_out, d_lse), mask, skip


@jax.jit
def _both_ways():
  """Per case and views in (True, False): out, lse and the gradients w.r.t. q, k, v of
  sum(out * d_out) + sum(lse * d_lse) over the rows that see a key."""
  results = {}
  for i, (name, (layout, b, t, n, kh, causal, segs, exclude, _)) in enumerate(CASES.items()):
    qkv, (d_out, d_lse), mask, skip = _inputs(b, t, n, kh, causal, segs, exclude, seed=i)
    for views in (True, False):

      def loss(q, k, v, layout=layout, mask=mask, skip=skip, views=views):
        out, lse = blocksparse.attend_layout(q, k, v, mask=mask, layout=layout, scale=H ** -0.5,
                                             exclude=skip, views=views)
        lse = jnp.where(lse > NEG_INF / 2, lse, 0.0)
        return jnp.sum(out * d_out) + jnp.sum(lse * d_lse), (out, lse)

      grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*qkv)
      results[name, views] = (out, lse, *grads)
  return results


def test_views_match_gathering_every_tile():
  results = _both_ways()
  for name, (layout, *_, expected) in CASES.items():
    assert blocksparse.reads(layout)[0] == expected, name
    for got, want, what in zip(results[name, True], results[name, False],
                               ('out', 'lse', 'dq', 'dk', 'dv')):
      _close(got, want, f'{name} {what}')


def test_reads_renumbers_a_band_by_offset():
  """A causal band of reach 2 reads offsets -2, -1, 0 (the first query blocks' missing ones
  EMPTY); the summary columns of `fixed` read the same blocks for every query block."""
  how, offsets, kind = blocksparse.reads(
      local.band_layout(40, 40, window=8, dilation=1, causal=True, heads=1, block=4))
  assert how == 'shift' and offsets.tolist() == [-2, -1, 0]
  np.testing.assert_array_equal(kind[0, :3] != blocksparse.EMPTY,
                                [[False, False, True], [False, True, True], [True, True, True]])
  how, blocks, _ = blocksparse.reads(sparse.fixed_layouts(300, block=8, summary=2, causal=True)[1])
  assert how == 'fixed' and blocks.tolist() == [0]
