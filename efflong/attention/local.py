"""Sliding-window attention, optionally dilated (Longformer, Beltagy et al. 2020, Sec. 3.1).

Query i sees key j when (i - j) is a multiple of the dilation d and |i - j| <= window * d (causal:
0 <= i - j <= window * d). O(T * window) time and memory.

A dilation shared by all heads is computed on positions grouped by residue mod d, where the dilated
band is a plain band of width `window`, so dilation costs nothing extra. A per-head dilation (the
paper dilates only some heads) uses one layout per head over the original order, visiting the blocks
of the widest band.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efflong import errors
from efflong.attention import blocksparse, dense
from efflong.mask import Mask

Dilation = int | Sequence[int]


def check_positive(**values: int | Sequence[int]) -> None:
  """Raises ValueError naming the first hyper-parameter that is not a positive int."""
  for name, value in values.items():
    for x in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
        raise errors.Error(f'{name}={value!r} must be a positive integer'
                           f'{" (or one per head)" if name == "dilation" else ""}.')


def default_block(window: int) -> int:
  """Tile size: the power of two nearest window / 2, within [16, 128]."""
  return int(min(128, max(16, 2 ** round(np.log2(max(window, 1) / 2)))))


def band_layout(t: int, s: int, *, window: int, dilation: Dilation, causal: bool, heads: int,
                block: int) -> blocksparse.Layout:
  """The layout of `local` for T queries over S keys (T == S)."""
  if isinstance(dilation, (tuple, list)):
    if len(dilation) != heads:
      raise errors.Error(f'dilation has {len(dilation)} entries; give one per head (N={heads}) or '
                         'one int.')
    if len(set(dilation)) == 1:
      dilation = dilation[0]
  nq, nk = blocksparse.num_blocks(t, block), blocksparse.num_blocks(s, block)
  if isinstance(dilation, (tuple, list)):

    def pattern(i, j, head):  # d = dilation[head] from Python ints: no array constant in kernels.
      d = sum(dh * (head == n).astype(jnp.int32) for n, dh in enumerate(dilation))
      return (jnp.abs(i - j) <= window * d) & ((i - j) % d == 0)

    reach = [-(-window * d // block) for d in dilation]
    sets = [blocksparse.band(nq, nk, -r, 0 if causal else r) for r in reach]
    return blocksparse.from_sets(sets, block, pattern=pattern)

  d = int(dilation)

  def pattern(i, j, head):
    del head
    return jnp.abs(i - j) <= window * d if d == 1 else (
        (jnp.abs(i - j) <= window * d) & ((i - j) % d == 0))

  reach = -(-window // block)
  sets = [blocksparse.band(nq, nk, -reach, 0 if causal else reach)]
  index = {} if d == 1 else dict(q_index=blocksparse.residue_index(t, d, block),
                                 k_index=blocksparse.residue_index(s, d, block))
  return blocksparse.from_sets(sets, block, pattern=pattern, **index)


def check_self(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, name: str, *,
               global_tokens: bool = False) -> None:
  """Shapes as in dense attention, plus T == S: sparse patterns are defined on one sequence.

  A family without global tokens refuses a mask that carries them, rather than ignoring them.
  """
  dense.check_shapes(q, k, v, mask)
  if q.shape[1] != k.shape[1]:
    raise errors.Error(f'{name} attention needs T == S (self-attention); got T={q.shape[1]}, '
                       f'S={k.shape[1]}.')
  if mask.global_tokens is not None and not global_tokens:
    raise errors.Error(f'{name} attention has no global tokens, but the mask (the batch field '
                       "'global_tokens') sets some; use longformer or bigbird.")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, window: int,
           dilation: Dilation = 1, block: int | None = None, scale: float | None = None,
           impl: str = 'xla') -> jax.Array:
  """Sliding-window (dilated) attention.

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H]; K divides N.
    mask: causal flag and segment ids.
    window: keys on each side (causal: before) of the query, in units of the dilation.
    dilation: one int, or one per query head.
    block: tile size C of the block-sparse layout (default from the window); any T is padded.
    scale: logit scale; default H ** -0.5.
    impl: 'xla' or 'pallas' (efflong.kernels.flash_attention), see `blocksparse.attend_layout`.
  Returns:
    [B, T, N, H].
  """
  check_positive(window=window, dilation=dilation, **({} if block is None else dict(block=block)))
  check_self(q, k, v, mask, 'local')
  t, n, h = q.shape[1], q.shape[2], q.shape[3]
  layout = band_layout(t, t, window=window, dilation=dilation, causal=mask.causal, heads=n,
                       block=block or default_block(window))
  out, _ = blocksparse.attend_layout(q, k, v, mask=mask, layout=layout,
                                     scale=h ** -0.5 if scale is None else scale, impl=impl)
  return out.astype(q.dtype)
