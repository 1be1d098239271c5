"""Cached decoding of Transformer-XL attention: prefill, then one token at a time, equals the
model's segment-by-segment run (each segment after a memory of mem_len keys, relative positions
continuing), built here directly from relative.attend with S = mem_len + segment_len keys."""

import jax
import jax.numpy as jnp
import numpy as np

from efflong.attention import Mask, relative
from tests.attention import arrays
from tests.attention.test_decode_linear import B, H, KH, LENGTHS, N, check_rows, replay, sequences

MEM, SEG, E = 3, 4, 16


def segmentwise(q, k, v, seg, **inputs):
  """relative.attend segment by segment: segment s's queries see [memory; segment], the memory
  being the MEM positions before it (segment id 0 before position 0 and on padding)."""
  length = q.shape[1]
  pad = -length % SEG
  ahead = lambda x: jnp.pad(x, [(0, 0), (MEM, pad)] + [(0, 0)] * (x.ndim - 2))
  q = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)])
  k, v, ids = ahead(k), ahead(v), ahead(jnp.asarray(seg))
  outs = []
  for start in range(0, length + pad, SEG):
    keys = slice(start, start + MEM + SEG)                  # Positions start - MEM ... in ahead().
    mask = Mask(causal=True, q_segment_ids=ids[:, start + MEM:start + MEM + SEG],
                kv_segment_ids=ids[:, keys])
    outs.append(relative.attend(q[:, start:start + SEG], k[:, keys], v[:, keys], mask=mask,
                                **inputs))
  return jnp.concatenate(outs, axis=1)[:, :length]


def test_xl_decoding_equals_the_segmentwise_run():
  q, k, v, mask = sequences(2)
  pos_proj, content_bias, pos_bias = arrays((E, N, H), (N, H), (N, H), seed=3, scale=0.5)
  inputs = dict(pos_proj=pos_proj, content_bias=content_bias, pos_bias=pos_bias)
  want = segmentwise(q, k, v, mask.q_segment_ids, **inputs)
  # The window matters: the full causal form (every earlier key) differs past MEM + SEG.
  full = relative.attend(q, k, v, mask=mask, **inputs)
  assert np.abs(np.asarray(want - full)[0, MEM + SEG:]).max() > 1e-3
  cache = relative.init_cache(B, 64, num_kv_heads=KH, head_dim=H, dtype=jnp.float32,
                              mem_len=MEM, segment_len=SEG)
  assert cache['k'].shape == (B, MEM + SEG, KH, H)
  got, _ = replay(jax.jit(relative.attend_step), cache, q, k, v, **inputs)
  check_rows(got, want, 'xl')
