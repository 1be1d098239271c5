"""Block-sparse attention: the one representation behind every fixed sparse pattern.

A pattern is computed as one or more *parts* whose key sets are disjoint and whose union is the
pattern; each part returns its own softmax statistics and `merge` combines them exactly (the
log-sum-exp rescaling of Milakov & Gimelshein 2018, as in FlashAttention).

A `Layout` part tiles the (possibly permuted) queries and keys into blocks of C positions and names,
for every query block, a fixed number V of key blocks to visit and what to do in each:

  kv_blocks [L, Nq, V] int32   key block visited in slot v by query block q (L = 1, or N per head)
  kind      [L, Nq, V] int8    EMPTY (padding slot), PATTERN (in-block mask `pattern`), FULL (all)
  pattern(q_pos, k_pos, head)  elementwise bool on *original* positions (broadcasting)
  q_index, k_index             optional static permutations: slot p holds original position
                               q_index[p] (-1 = padding); permuting by a residue class turns dilated
                               and strided patterns into block-local ones.

Shapes are static and V is fixed, so the same layout drives the XLA path here (read the visited key
blocks, blocked softmax) and the Pallas kernels (efflong.kernels.flash_attention read the arrays
as tile indices and visit the tiles in place). The XLA path renumbers the slots first (`reads`): a
band's by their offset from the query block, so every head shares one read of O blocks per query
block; blocks that every query block visits become one view, and the logits one large matmul.
Everything is O(T * V * C): no T x S score, mask or index array exists on this path.

The segment-id / causal part of the mask (`Mask.allowed`) is applied on original positions, so
padding, packing and causality hold whatever the permutation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from efflong import errors, kernels
from efflong.kernels import flash_attention
from efflong.mask import Mask, Pattern, softmax

EMPTY, PATTERN, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Which key blocks each query block visits; see the module docstring.

  Attributes:
    block: C, positions per block (queries and keys).
    kv_blocks: [L, Nq, V] int32 key-block indices (L = 1 or one per query head).
    kind: [L, Nq, V] int8 in {EMPTY, PATTERN, FULL}.
    pattern: in-block mask on original positions, used in PATTERN slots; None means FULL only.
    q_index: [Nq * C] original query position per slot (-1 = padding), or None (identity).
    k_index: [Nk * C] original key position per slot (-1 = padding), or None (identity).
  """

  block: int
  kv_blocks: np.ndarray
  kind: np.ndarray
  pattern: Pattern | None = None
  q_index: np.ndarray | None = None
  k_index: np.ndarray | None = None

  def __post_init__(self):
    if self.kv_blocks.shape != self.kind.shape or self.kv_blocks.ndim != 3:
      raise errors.Error(f'Layout kv_blocks {self.kv_blocks.shape} and kind {self.kind.shape} must '
                         'be one [L, Nq, V] shape.')
    if self.pattern is None and np.any(self.kind == PATTERN):
      raise errors.Error('Layout has PATTERN slots but no pattern function.')

  @property
  def heads(self) -> int:
    return self.kv_blocks.shape[0]

  def density(self, q_len: int, kv_len: int) -> float:
    """Fraction of the T x S score matrix this layout computes (visited blocks, not allowed pairs)."""
    visited = np.count_nonzero(self.kind != EMPTY) * self.block ** 2
    return visited / (self.heads * q_len * kv_len)


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def identity_index(length: int, block: int) -> np.ndarray:
  """Positions 0..length-1 padded with -1 to a multiple of block."""
  index = np.full(num_blocks(length, block) * block, -1, np.int32)
  index[:length] = np.arange(length)
  return index


def residue_index(length: int, modulus: int, block: int) -> np.ndarray:
  """Positions grouped by residue mod `modulus` (0, m, 2m, ..., 1, 1+m, ...), padded with -1.

  Within a group the order is kept, so a band of width w in this order is the band of width w * m in
  the original order restricted to one residue class.
  """
  order = np.concatenate([np.arange(r, length, modulus) for r in range(modulus)]).astype(np.int32)
  index = np.full(num_blocks(length, block) * block, -1, np.int32)
  index[:length] = order
  return index


def from_sets(block_sets: list[list[list[tuple[int, int]]]], block: int, **kw) -> Layout:
  """Builds a Layout from per-head, per-query-block lists of (key block, kind); pads with EMPTY."""
  visits = max(1, max(len(s) for head in block_sets for s in head))
  shape = (len(block_sets), len(block_sets[0]), visits)
  kv_blocks, kind = np.zeros(shape, np.int32), np.zeros(shape, np.int8)
  for h, head in enumerate(block_sets):
    for q, slots in enumerate(head):
      for v, (kb, kd) in enumerate(sorted(slots)):
        kv_blocks[h, q, v], kind[h, q, v] = kb, kd
  return Layout(block, kv_blocks, kind, **kw)


def dense_layout(q_len: int, kv_len: int, *, causal: bool, block: int | None = None) -> Layout:
  """Full attention as a layout: every key tile, or, causal (queries aligned at the end of the
  keys), the tiles up to the last query's diagonal. block: default 128, or the power of two >= the
  length (at least 16) for shorter sequences."""
  c = block or min(128, kernels.pow2(max(q_len, kv_len), 16))
  nq, nk = num_blocks(q_len, c), num_blocks(kv_len, c)
  last = np.minimum(np.arange(nq) * c + c, q_len) - 1 + (kv_len - q_len)
  reach = np.minimum(last // c + 1, nk) if causal else np.full(nq, nk)
  return from_sets([[[(kb, FULL) for kb in range(reach[q])] for q in range(nq)]], c)


def reads(layout: Layout) -> tuple[str, np.ndarray, np.ndarray]:
  """How the XLA path reads the visited key blocks: the layout's slots renumbered where that lets
  query blocks or heads share what they read.

  Returns (how, which, kind):
    ('fixed', blocks [O], kind [L, Nq, O]) when slot o holds the same block blocks[o] for every
      query block that uses it (the summary columns of `fixed`): one view of the keys, shared by
      every query block, so the logits are one large matmul;
    ('shift', offsets [O], kind [L, Nq, O]) when every visited block is its query block plus one
      of O <= V offsets (a band, also one per head): slot o of query block q reads block
      q + offsets[o], one read shared by every head;
    ('gather', kv_blocks [L, Nq, V], kind [L, Nq, V]) otherwise (BigBird's random blocks): each
      head gathers its own.
  """
  lh, nq, nv = layout.kv_blocks.shape
  used = layout.kind != EMPTY
  blocks = [np.unique(layout.kv_blocks[..., v][used[..., v]]) for v in range(nv)]
  if all(x.size <= 1 for x in blocks):
    return 'fixed', np.array([x[0] if x.size else 0 for x in blocks], np.int32), layout.kind
  offsets = layout.kv_blocks - np.arange(nq)[:, None]
  shifts = np.unique(offsets[used])
  if shifts.size <= nv:
    kind = np.full((lh, nq, shifts.size), EMPTY, np.int8)
    head, qb, _ = np.nonzero(used)
    kind[head, qb, np.searchsorted(shifts, offsets[used])] = layout.kind[used]
    if np.count_nonzero(kind) == np.count_nonzero(used):  # No block visited twice by one row.
      return 'shift', shifts, kind
  return 'gather', layout.kv_blocks, layout.kind


def band(num_q: int, num_k: int, lo: int, hi: int) -> list[list[tuple[int, int]]]:
  """Per query block q, the key blocks q + lo .. q + hi that exist, all PATTERN."""
  return [[(kb, PATTERN) for kb in range(max(0, q + lo), min(num_k, q + hi + 1))]
          for q in range(num_q)]


def _inverse(index: np.ndarray, length: int) -> np.ndarray:
  """For each original position 0..length-1, its slot in `index`."""
  inverse = np.empty(length, np.int32)
  slots = np.nonzero(index >= 0)[0]
  inverse[index[slots]] = slots
  return inverse


def attend_layout(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, layout: Layout,
                  scale: float, exclude: jax.Array | None = None, impl: str = 'xla',
                  views: bool = True) -> tuple[jax.Array, jax.Array]:
  """One block-sparse part: softmax attention over the pairs the layout and the mask allow.

  Args:
    q: [B, T, N, H].
    k, v: [B, S, K, H]; K divides N.
    mask: causal flag and segment ids, applied on original positions.
    layout: the part's layout; L is 1 or N.
    scale: logit scale.
    exclude: [B, S] bool keys this part must not see (another part covers them), or None.
    impl: 'xla' (here: the visited key tiles read as `reads` says) or 'pallas'
      (efflong.kernels.flash_attention, which reads the visited tiles in place and skips tiles
      with no allowed pair).
    views: the XLA path reads the key tiles as `reads` renumbers them (shared by the heads, or by
      the query blocks); False reads each head's slots as the layout lists them (the twin).
  Returns:
    out [B, T, N, H] float32, normalised over this part's keys (zeros where it has none), and
    lse [B, T, N] float32, the log-sum-exp of its logits (NEG_INF where it has none).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g, c = n // kh, layout.block
  lh, nq, nv = layout.kv_blocks.shape
  q_index = identity_index(t, c) if layout.q_index is None else layout.q_index
  k_index = identity_index(s, c) if layout.k_index is None else layout.k_index
  if lh not in (1, n) or len(q_index) != nq * c or np.max(layout.kv_blocks) * c >= len(k_index):
    raise errors.Error(f'Layout [{lh}, {nq}, {nv}] x block {c} does not fit T={t}, S={s}, N={n}.')
  impl = kernels.resolve(impl, tile=c)
  if impl == 'pallas':
    out, lse = _attend_kernel(q, k, v, mask=mask, layout=layout, scale=scale, exclude=exclude,
                              q_index=q_index, k_index=k_index)
    return _unpermute(out, lse, layout.q_index, q_index, t)

  # The key block each slot reads (`reads`): [Nq, O] (shift, and a gather shared by the heads),
  # [1, O] (fixed: the same for every query block) or [N, Nq, V] (a gather per query head); and
  # the original position of every query slot [Nq, C] and read key slot (-1 where there is none).
  how, which, kind = reads(layout) if views else ('gather', layout.kv_blocks, layout.kind)
  nk, o = len(k_index) // c, which.shape[-1]
  per_head = how == 'gather' and lh > 1
  read = {'shift': np.arange(nq)[:, None] + which, 'fixed': which[None]}.get(how, which)
  read = read if per_head else read.reshape(-1, o)
  exists = (read >= 0) & (read < nk)
  read = np.where(exists, read, 0)
  k_pos = np.where(exists[..., None], k_index.reshape(nk, c)[read], -1)
  k_pos = k_pos.reshape(*read.shape[:-1], o * c)
  kp = _by_head(jnp.asarray(k_pos if per_head else k_pos[None]), kh)  # [K|1, Nq|1, G|1, 1, S]
  kind = _by_head(jnp.asarray(np.repeat(kind, c, axis=-1)), kh)        # [K|1, Nq, G|1, 1, S]
  q_pos = jnp.asarray(q_index.reshape(nq, c))
  qp = q_pos[:, None, :, None]                                         # [Nq, 1, C, 1]

  # Query rows as one matmul dimension M wherever the keys allow: G * C, or Nq * G * C.
  q_spec, rows = {'fixed': ('M', (nq * g * c,))}.get(
      how, ('QGC', (nq, g, c)) if per_head else ('QM', (nq, g * c)))
  kv_spec = {'fixed': 'BKSH'}.get(how, 'BKQGSH' if per_head else 'BKQSH')

  def view(x: jax.Array) -> jax.Array:  # [B, S, K, H] -> the key slots, as kv_spec names them
    xb = jnp.moveaxis(_permute(x, layout.k_index, len(k_index)), 2, 1).reshape(b, kh, nk, c, h)
    if per_head:
      blk = read.reshape(kh, g, nq, o).transpose(0, 2, 1, 3)                    # [K, Nq, G, V]
      return xb[:, np.arange(kh)[:, None, None, None], blk].reshape(b, kh, nq, g, o * c, h)
    first = read.flat[0]
    if np.array_equal(read.ravel(), np.arange(first, first + read.size)):  # One run: a slice.
      xb = xb[:, :, first:first + read.size]
    else:
      # Whole C x H blocks are gathered (and scatter-added, backwards): on the CPU as fast as a
      # concatenation of shifted slices, whose backward (a sum of shifted slices) XLA fuses with
      # the transposes the projections' gradients need, three times slower.
      xb = jnp.take(xb, jnp.asarray(read), axis=2)
    return xb.reshape(b, kh, *((nq,) if how != 'fixed' else ()), o * c, h)  # [B, K, Nq?, S, H]

  # Logits [B, K, *rows, S] in the matmuls' own layout: no transpose of that size anywhere.
  qb = _permute(q, layout.q_index, nq * c).reshape(b, nq, c, kh, g, h).transpose(0, 3, 1, 4, 2, 5)
  kb, vb = view(k), view(v)
  logits = jnp.einsum(f'BK{q_spec}H,{kv_spec}->BK{q_spec}S', qb.reshape(b, kh, *rows, h), kb,
                      preferred_element_type=jnp.float32)

  inside = kind == FULL
  if layout.pattern is not None:
    head = jnp.arange(n).reshape(kh, 1, g, 1, 1) if lh > 1 else jnp.zeros((), jnp.int32)
    inside |= (kind == PATTERN) & layout.pattern(qp, kp, head)
  ok = inside & (qp >= 0) & (kp >= 0)
  seg = mask.q_segment_ids is not None
  ok = ok & mask.allowed(
      qp, kp, _gather(mask.q_segment_ids, q_pos)[:, None, :, None, :, None] if seg else None,
      _gather(mask.kv_segment_ids, kp) if seg else None, t, s)
  if exclude is not None:
    ok = ok & ~_gather(exclude, kp)

  probs, total, lse = softmax(logits.reshape(b, kh, nq, g, c, -1) * scale, ok)
  out = jnp.einsum(f'BK{q_spec}S,{kv_spec}->BK{q_spec}H',
                   probs.astype(v.dtype).reshape(logits.shape), vb,
                   preferred_element_type=jnp.float32)
  # Normalised as a [rows, H] matrix: on the CPU, XLA's reduction over H (in the backward) is ten
  # times slower on a shape with unit dimensions (B = 1, G = 1).
  out = (out.reshape(-1, h) / total.reshape(-1, 1)).reshape(b, kh, nq, g, c, h)
  out = out.transpose(0, 2, 4, 1, 3, 5).reshape(b, nq * c, n, h)
  lse = lse.transpose(0, 2, 4, 1, 3).reshape(b, nq * c, n)
  return _unpermute(out, lse, layout.q_index, q_index, t)


def _by_head(x: jax.Array, kh: int) -> jax.Array:
  """[L, Nq|1, S] (L = 1, or N = K * G query heads) -> [K|1, Nq|1, G|1, 1, S]."""
  x = x.reshape(min(x.shape[0], kh), -1, *x.shape[1:])
  return jnp.moveaxis(x, 1, 2)[..., None, :]


def _permute(x: jax.Array, index: np.ndarray | None, length: int) -> jax.Array:
  """x [B, S, ...] -> [B, length, ...] in slot order (padding slots read position 0)."""
  if index is None:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  return jnp.take(x, jnp.asarray(np.maximum(index, 0)), axis=1)


def _unpermute(out: jax.Array, lse: jax.Array, index: np.ndarray | None, q_index: np.ndarray,
               t: int) -> tuple[jax.Array, jax.Array]:
  """out [B, Nq * C, N, H] and lse [B, Nq * C, N] from slot order back to the T positions."""
  if index is None:
    return out[:, :t], lse[:, :t]
  inverse = jnp.asarray(_inverse(q_index, t))
  return jnp.take(out, inverse, axis=1), jnp.take(lse, inverse, axis=1)


def _attend_kernel(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, layout: Layout,
                   scale: float, exclude: jax.Array | None, q_index: np.ndarray,
                   k_index: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """attend_layout's Pallas path, in slot order: out [B, Nq * C, N, H], lse [B, Nq * C, N]."""
  blocks, flags, count = flash_attention.compact(layout.kv_blocks, layout.kind != EMPTY,
                                                 layout.kind == PATTERN)
  spec = flash_attention.Spec(layout.block, blocks, flags, count, layout.pattern, mask.causal,
                              q.shape[1], k.shape[1], scale, kernels.interpret())
  k_pos = jnp.asarray(k_index)[None, None]
  if exclude is not None:
    k_pos = jnp.where(_gather(exclude, jnp.asarray(k_index)), -1, k_pos[0])[:, None]
  segs = {}
  if mask.q_segment_ids is not None:
    segs = dict(q_seg=_gather(mask.q_segment_ids, jnp.asarray(q_index))[:, None],
                k_seg=_gather(mask.kv_segment_ids, jnp.asarray(k_index))[:, None])
  return flash_attention.attend_slots(
      _permute(q, layout.q_index, len(q_index)), _permute(k, layout.k_index, len(k_index)),
      _permute(v, layout.k_index, len(k_index)), spec=spec, q_pos=jnp.asarray(q_index)[None, None],
      k_pos=k_pos, **segs)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T] at index (any shape; -1 reads position 0): [B, *index.shape]."""
  return jnp.take(x, jnp.maximum(index, 0), axis=1)


def merge(parts: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """Combines parts over disjoint key sets into the softmax over their union.

  Args:
    parts: (out [B, T, N, H], lse [B, T, N]) pairs, each normalised over its own keys.
  Returns:
    (out, lse) of the union; rows no part covers stay zero.
  """
  lse = functools.reduce(jnp.logaddexp, [lse for _, lse in parts])
  out = sum(o * jnp.exp(l - lse)[..., None] for o, l in parts)
  return out, lse


# Decoding: each new query reads its own M keys, gathered by position (the sparse families' steps).


def gather_positions(x: jax.Array, index: jax.Array) -> jax.Array:
  """Keys or values at per-query positions.

  Args:
    x: [B, S, K, H].
    index: [B, T, 1, M] positions in [0, S) shared by the query heads, or [B, T, N, M] one set per
      query head (query head n reads kv head n // (N / K)).
  Returns:
    [B, T, M, K, H], or [B, T, M, N, H] with one set per query head.
  """
  b, kh = x.shape[0], x.shape[2]
  rows = jnp.arange(b)[:, None, None, None]
  if index.shape[2] == 1:
    return x[rows[..., 0], index[:, :, 0]]
  n = index.shape[2]
  heads = (jnp.arange(n) // (n // kh))[None, None, :, None]
  return jnp.moveaxis(x[rows, index, heads], 3, 2)


def attend_gathered(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                    scale: float) -> tuple[jax.Array, jax.Array]:
  """Softmax attention of every query over its own gathered keys (`gather_positions`).

  Args:
    q: [B, T, N, H].
    k, v: [B, T, M, Kx, H]: M keys per query, Kx kv heads (K shared by N / K query heads, or N).
    allowed: [B, T, 1|N, M] bool.
    scale: logit scale.
  Returns:
    out [B, T, N, H] float32 (zeros where nothing is allowed) and lse [B, T, N] float32.
  """
  b, t, n, h = q.shape
  kx = k.shape[3]
  qg = q.reshape(b, t, kx, n // kx, h)
  logits = jnp.einsum('BTKGH,BTMKH->BTKGM', qg, k, preferred_element_type=jnp.float32) * scale
  ok = allowed.reshape(b, t, kx, n // kx, -1) if allowed.shape[2] == n else allowed[:, :, :, None]
  probs, total, lse = softmax(logits, ok)
  out = jnp.einsum('BTKGM,BTMKH->BTKGH', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / total[..., None]
  return out.reshape(b, t, n, h), lse.reshape(b, t, n)
