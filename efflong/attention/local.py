"""Sliding-window attention, optionally dilated (Longformer, Beltagy et al. 2020, Sec. 3.1).

Query i sees key j when (i - j) is a multiple of the dilation d and |i - j| <= window * d (causal:
0 <= i - j <= window * d). O(T * window) time and memory.

A dilation shared by all heads is computed on positions grouped by residue mod d, where the dilated
band is a plain band of width `window`, so dilation costs nothing extra. A per-head dilation (the
paper dilates only some heads) uses one layout per head over the original order, visiting the blocks
of the widest band.

Decoding (init_cache / attend_step) keeps a ring buffer of the last window * d keys and values
(d: the largest dilation), slot = position mod size; which position a slot holds follows from the
row's length, so no positions are stored. A query gathers its window + 1 keys (from the ring or the
new block): O(window) per token, flat in the context length.
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


def check_step(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, name: str, *,
               global_tokens: bool = False) -> None:
  """attend_step's checks: the shapes of `check_self` (new positions only) and a causal mask; a
  family with global tokens decodes with the first `global_tokens` positions, never with flags."""
  check_self(q, k, v, mask, name, global_tokens=global_tokens)
  if not mask.causal:
    raise errors.Error(f'{name} decoding (attend_step) is causal; got a mask with causal=False.')
  if mask.global_tokens is not None:
    raise errors.Error(
        f'{name} decoding takes the first global_tokens positions as its global tokens, not '
        "per-example flags (the batch field 'global_tokens'): a flagged token's row attends to "
        'every earlier key, so decoding it would need the whole context cached; decode without '
        'global_tokens flags.')


def ring_size(window: int, dilation: Dilation) -> int:
  """Slots of the decoding ring: the keys before a query that any head's window reaches."""
  return window * max(dilation if isinstance(dilation, (tuple, list)) else (dilation,))


def init_cache(batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype,
               window: int, dilation: Dilation = 1) -> dict[str, jax.Array]:
  """An empty ring: k, v [B, window * max(dilation), K, H] zeros, length [B] int32 zeros.

  Its size does not depend on max_len.
  """
  del max_len
  check_positive(window=window, dilation=dilation)
  return dense.init_cache(batch, ring_size(window, dilation), num_kv_heads=num_kv_heads,
                          head_dim=head_dim, dtype=dtype)


def window_step(k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], positions: jax.Array,
                real: jax.Array, length: jax.Array, *, window: int, dilation: Dilation,
                heads: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, dict]:
  """The window keys of each new query, gathered from the ring and the new block, and the ring
  with the new keys written.

  Query at position p reads p - j * d for j = 0..window (d per head with a per-head dilation).
  Positions before cache['length'] come from the ring (slot = position mod size: the ring holds the
  latest size positions, and p - window * d >= length - size), later ones from the new block.
  Only the last `size` real new positions are written, so no two writes share a slot.

  Args:
    k, v: [B, T, K, H] new keys and values.
    cache: the ring, k, v [B, size, K, H] and length [B].
    positions, real: [B, T] absolute positions of the new queries and whether each is real.
    length: [B] the new length (cache['length'] + real positions).
    window, dilation: as in `attend`.
    heads: N.
  Returns:
    keys, values [B, T, window + 1, Kx, H] (Kx = K, or N with a per-head dilation), their positions
    [B, T, 1|N, window + 1], allowed [B, T, 1|N, window + 1] (exists and is real), the new ring.
  """
  if isinstance(dilation, (tuple, list)) and len(dilation) != heads:
    raise errors.Error(f'dilation has {len(dilation)} entries; give one per head (N={heads}) or '
                       'one int.')
  old, size, t = cache['length'], cache['k'].shape[1], k.shape[1]
  d = jnp.asarray(dilation if isinstance(dilation, (tuple, list)) else (dilation,), jnp.int32)
  x = positions[:, :, None, None] - d[:, None] * jnp.arange(window + 1)  # [B, T, 1|N, W+1]
  new = x >= old[:, None, None, None]
  in_block = jnp.clip(x - old[:, None, None, None], 0, t - 1)
  allowed = (x >= 0) & (~new | real[jnp.arange(k.shape[0])[:, None, None, None], in_block])
  pick = jnp.moveaxis(new, 2, 3)[..., None]                             # [B, T, W+1, 1|N, 1]
  keys, values = (jnp.where(pick, blocksparse.gather_positions(fresh, in_block),
                            blocksparse.gather_positions(ring, x % size))
                  for fresh, ring in ((k, cache['k']), (v, cache['v'])))
  last = real & (positions >= length[:, None] - size)
  ring = {'k': dense.write(cache['k'], positions % size, last, k),
          'v': dense.write(cache['v'], positions % size, last, v), 'length': length}
  return keys, values, x, allowed, ring


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, window: int, dilation: Dilation = 1, block: int | None = None,
                scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal sliding-window attention of T new positions over the ring and themselves.

  Args:
    q: [B, T, N, H] queries of the new positions (absolute positions cache['length'] + i).
    k, v: [B, T, K, H] their keys and values; K divides N.
    cache: from init_cache.
    mask: causal; q_segment_ids [B, T] marks real new positions (1) and right-padding (0).
    window, dilation: as in `attend`.
    block: attend's tile size; unused here (a step gathers its keys, it has no tiles).
    scale: logit scale; default H ** -0.5.
  Returns:
    out [B, T, N, H] (finite, arbitrary at padding) and the ring with the real positions added.
  """
  del block
  check_positive(window=window, dilation=dilation)
  check_step(q, k, v, mask, 'local')
  positions, real, length = dense.new_positions(cache, mask, q.shape[1])
  keys, values, _, allowed, ring = window_step(k, v, cache, positions, real, length,
                                               window=window, dilation=dilation, heads=q.shape[2])
  out, _ = blocksparse.attend_gathered(q, keys, values, allowed,
                                       q.shape[3] ** -0.5 if scale is None else scale)
  return out.astype(q.dtype), ring
