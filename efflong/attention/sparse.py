"""Strided and fixed factorised patterns of the Sparse Transformer (Child et al. 2019, Sec. 4.2).

strided (stride l): query i sees key j when i - j < l (causal; |i - j| < l bidirectional) or
  (i - j) mod l == 0.
fixed (block l, summary c): query i sees key j in its own block (floor(j / l) == floor(i / l)) or at
  a summary position (j mod l >= l - c).

Both are unions of two parts computed as two block-sparse layouts and merged exactly: a band (own
block) part in the original order, and a column (summary) part over keys gathered by residue mod l
(summary positions). With `factorized=True` the first half of the heads computes only the first part
and the second half only the second, the paper's split of the pattern over heads (its Eq. 2 with
separate heads). Cost per query: O(l + T / l) for strided, O(l + T * c / l) for fixed.

Decoding keeps every key and value (dense.init_cache, [B, S_max, K, H]); a step gathers, for each new
query, only the candidates its pattern can allow at its position (a static count M per query,
computed from the position and S_max, masked where they do not exist): M = l + (S_max - 1) // l for
strided, l + c * ((S_max - 1) // l) for fixed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from efflong import errors
from efflong.attention import blocksparse, dense, local
from efflong.attention.blocksparse import PATTERN, Layout
from efflong.mask import Mask


def strided_layouts(t: int, *, stride: int, causal: bool, block: int,
                    disjoint: bool = True) -> list[Layout]:
  """The band part (|i - j| < stride) and the column part ((i - j) mod stride == 0); disjoint:
  the column part leaves out j == i, which the band has (parts that are merged must not overlap)."""
  band = local.band_layout(t, t, window=stride - 1, dilation=1, causal=causal, heads=1,
                           block=block)
  index = blocksparse.residue_index(t, stride, block)
  starts = np.cumsum([0] + [len(range(r, t, stride)) for r in range(stride)])
  group = np.searchsorted(starts, np.arange(len(index)), side='right') - 1  # slot -> residue
  nq = blocksparse.num_blocks(t, block)
  overlap = not disjoint
  sets = []
  for q in range(nq):
    lo, hi = group[q * block], group[min(q * block + block, t) - 1]
    first, last = starts[lo] // block, (starts[hi + 1] - 1) // block
    sets.append([(kb, PATTERN) for kb in range(first, q + 1 if causal else last + 1)])
  column = blocksparse.from_sets(
      [sets], block, pattern=lambda i, j, h: ((i - j) % stride == 0) & ((i != j) | overlap),
      q_index=index, k_index=index)
  return [band, column]


def fixed_layouts(t: int, *, block: int, summary: int, causal: bool,
                  disjoint: bool = True) -> list[Layout]:
  """The own-block part and the summary part (the summary columns; disjoint: only those of the
  other blocks)."""
  tile = block * max(1, 128 // block)
  nq = blocksparse.num_blocks(t, tile)
  own = blocksparse.from_sets([[[(q, PATTERN)] for q in range(nq)]], tile,
                              pattern=lambda i, j, h: i // block == j // block)
  cols = np.nonzero(np.arange(t) % block >= block - summary)[0].astype(np.int32)
  k_index = np.full(blocksparse.num_blocks(max(len(cols), 1), tile) * tile, -1, np.int32)
  k_index[:len(cols)] = cols
  overlap = not disjoint
  sets = []
  for q in range(nq):
    visible = np.count_nonzero(cols <= min(q * tile + tile, t) - 1) if causal else len(cols)
    sets.append([(kb, PATTERN) for kb in range(blocksparse.num_blocks(visible, tile))])
  columns = blocksparse.from_sets([sets], tile,
                                  pattern=lambda i, j, h: (i // block != j // block) | overlap,
                                  k_index=k_index)
  return [own, columns]


def _split_heads(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """[B, T, K, H] -> the kv heads of query heads [0, n/2) and [n/2, n)."""
  kh = x.shape[2]
  if kh % 2:
    x = jnp.repeat(x, n // kh, axis=2)
  half = x.shape[2] // 2
  return x[:, :, :half], x[:, :, half:]


def attend_parts(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, layouts: list[Layout],
                 factorized: bool, scale: float | None, impl: str) -> jax.Array:
  """Merges the parts' softmaxes (all heads), or gives each half of the heads one part."""
  n, h = q.shape[2], q.shape[3]
  scale = h ** -0.5 if scale is None else scale
  if not factorized:
    parts = [blocksparse.attend_layout(q, k, v, mask=mask, layout=lay, scale=scale, impl=impl)
             for lay in layouts]
    return blocksparse.merge(parts)[0].astype(q.dtype)
  if n % 2:
    raise errors.Error(f'factorized=True splits the heads in two; N={n} is odd.')
  halves = zip((q[:, :, :n // 2], q[:, :, n // 2:]), _split_heads(k, n), _split_heads(v, n),
               layouts)
  outs = [blocksparse.attend_layout(qh, kh, vh, mask=mask, layout=lay, scale=scale, impl=impl)[0]
          for qh, kh, vh, lay in halves]
  return jnp.concatenate(outs, axis=2).astype(q.dtype)


def strided(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, stride: int,
            factorized: bool = False, block: int | None = None, scale: float | None = None,
            impl: str = 'xla') -> jax.Array:
  """Strided sparse attention.

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H]; K divides N.
    mask: causal flag and segment ids.
    stride: l, the band width and the column period.
    factorized: split the two parts over the two halves of the heads.
    block: tile size of the layouts (default from the stride); any T is padded.
    scale: logit scale; default H ** -0.5.
    impl: 'xla' or 'pallas' (efflong.kernels.flash_attention), see `blocksparse.attend_layout`.
  Returns:
    [B, T, N, H].
  """
  local.check_positive(stride=stride, **({} if block is None else dict(block=block)))
  local.check_self(q, k, v, mask, 'strided')
  layouts = strided_layouts(q.shape[1], stride=stride, causal=mask.causal,
                            block=block or local.default_block(stride), disjoint=not factorized)
  return attend_parts(q, k, v, mask=mask, layouts=layouts, factorized=factorized, scale=scale,
                      impl=impl)


def fixed(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, block: int, summary: int = 1,
          factorized: bool = False, scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """Fixed sparse attention.

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H]; K divides N.
    mask: causal flag and segment ids.
    block: l, the block length.
    summary: c, the last c positions of every block are summary positions (1 <= c <= l).
    factorized: split the two parts over the two halves of the heads.
    scale: logit scale; default H ** -0.5.
    impl: 'xla' or 'pallas' (efflong.kernels.flash_attention), see `blocksparse.attend_layout`.
  Returns:
    [B, T, N, H].
  """
  local.check_positive(block=block, summary=summary)
  if summary > block:
    raise errors.Error(f'summary={summary} must be <= block={block}.')
  local.check_self(q, k, v, mask, 'fixed')
  layouts = fixed_layouts(q.shape[1], block=block, summary=summary, causal=mask.causal,
                          disjoint=not factorized)
  return attend_parts(q, k, v, mask=mask, layouts=layouts, factorized=factorized, scale=scale,
                      impl=impl)


# Decoding. A candidate function maps new positions [B, T] to candidate key positions
# [B, T, 1, M] and the two parts' masks over them (band / own block, column / summary), which
# `factorized` gives to the two halves of the heads and otherwise unites; the candidates are
# distinct positions, so the union is one softmax.


def strided_candidates(positions: jax.Array, *, stride: int,
                       max_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The keys a strided query can see: p - j for j < l (band), then p - m * l for m >= 1 (column).

  Args:
    positions: [B, T] absolute query positions.
    stride: l.
    max_len: S_max, the cache length (the furthest column).
  Returns:
    key positions [B, T, 1, M] with M = l + (S_max - 1) // l, and the band and column parts'
    masks [B, T, 1, M] (the column's includes j == p, which the factorized column head sees).
  """
  back = np.concatenate([np.arange(stride), stride * np.arange(1, (max_len - 1) // stride + 1)])
  x = positions[:, :, None, None] - jnp.asarray(back, jnp.int32)
  return x, (x >= 0) & jnp.asarray(back < stride), (x >= 0) & jnp.asarray(back % stride == 0)


def fixed_candidates(positions: jax.Array, *, block: int, summary: int,
                     max_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The keys a fixed query can see: its block up to itself, then the summary positions (the last
  c of each block) of the earlier blocks.

  Args:
    positions: [B, T] absolute query positions.
    block: l.
    summary: c.
    max_len: S_max, the cache length (the number of earlier blocks).
  Returns:
    key positions [B, T, 1, M] with M = l + c * ((S_max - 1) // l), and the own-block and summary
    parts' masks [B, T, 1, M] (the summary's includes the own block's summary positions up to p).
  """
  p = positions[:, :, None, None]
  start = p - p % block
  earlier = (np.arange((max_len - 1) // block)[:, None] * block + block - summary
             + np.arange(summary)).reshape(-1)
  x = jnp.concatenate([p - jnp.arange(block),
                       jnp.broadcast_to(earlier, p.shape[:3] + earlier.shape)], axis=-1)
  own = jnp.arange(x.shape[-1]) < block
  first = own & (x >= start)
  return x, first, (first & (x % block >= block - summary)) | (~own & (x < start))


def attend_candidates(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                      mask: Mask, name: str, candidates, factorized: bool,
                      scale: float | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A decoding step over a full cache: write the new keys, gather each query's candidates.

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H] the new positions; cache: dense.init_cache's.
    mask: causal; q_segment_ids marks real new positions.
    name: the family, for errors.
    candidates: positions [B, T] -> (key positions [B, T, 1, M], part masks [B, T, 1, M] x 2).
    factorized: the first half of the heads sees the first part only, the second the second.
    scale: logit scale or None (H ** -0.5).
  Returns:
    out [B, T, N, H] and the cache with the real positions added.
  """
  local.check_step(q, k, v, mask, name)
  n, s = q.shape[2], cache['k'].shape[1]
  if factorized and n % 2:
    raise errors.Error(f'factorized=True splits the heads in two; N={n} is odd.')
  positions, real, length = dense.new_positions(cache, mask, q.shape[1])
  ck, cv = dense.write(cache['k'], positions, real, k), dense.write(cache['v'], positions, real, v)
  x, first, second = candidates(positions)
  if factorized:
    half = x.shape[:2] + (n // 2, x.shape[3])
    allowed = jnp.concatenate([jnp.broadcast_to(first, half), jnp.broadcast_to(second, half)], 2)
  else:
    allowed = first | second
  index = jnp.clip(x, 0, s - 1)
  out, _ = blocksparse.attend_gathered(
      q, blocksparse.gather_positions(ck, index), blocksparse.gather_positions(cv, index),
      allowed & (x < s), q.shape[3] ** -0.5 if scale is None else scale)
  return out.astype(q.dtype), {'k': ck, 'v': cv, 'length': length}


def strided_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                 mask: Mask, stride: int, factorized: bool = False, block: int | None = None,
                 scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal strided attention of T new positions over the cache (dense.init_cache) and themselves.

  Each query reads l + (S_max - 1) // l gathered keys (`strided_candidates`). Arguments as in
  `strided` (block, the tile size, is unused here) and `dense.attend_step` (q, k, v: the new
  positions; cache). Returns out [B, T, N, H] and the cache with the real positions added.
  """
  del block
  local.check_positive(stride=stride)
  candidates = functools.partial(strided_candidates, stride=stride, max_len=cache['k'].shape[1])
  return attend_candidates(q, k, v, cache, mask=mask, name='strided', candidates=candidates,
                           factorized=factorized, scale=scale)


def fixed_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
               mask: Mask, block: int, summary: int = 1, factorized: bool = False,
               scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal fixed attention of T new positions over the cache (dense.init_cache) and themselves.

  Each query reads l + c * ((S_max - 1) // l) gathered keys (`fixed_candidates`). Arguments as in
  `fixed` and `dense.attend_step`. Returns out [B, T, N, H] and the cache with the real positions
  added.
  """
  local.check_positive(block=block, summary=summary)
  if summary > block:
    raise errors.Error(f'summary={summary} must be <= block={block}.')
  candidates = functools.partial(fixed_candidates, block=block, summary=summary,
                                 max_len=cache['k'].shape[1])
  return attend_candidates(q, k, v, cache, mask=mask, name='fixed', candidates=candidates,
                           factorized=factorized, scale=scale)
