"""Block-sparse FlashAttention in Pallas: forward, and a backward of separate dq and dk/dv kernels.

The kernels compute softmax attention over the tiles a block layout names, the way FlashAttention-2
(Dao 2023, Alg. 1 and 2) computes it over all tiles: an online softmax over the visited key tiles
(running max m, running sum l, rescaled accumulator; Milakov & Gimelshein 2018), the row log-sum-exp
saved for the backward, and the backward split in two kernels so that no tile is written by two
programs: dq walks a query tile's key tiles, dk/dv walks a key tile's query tiles (the transposed
layout).

Everything arrives in *slot order* (the caller permutes and pads; see
`efflong.attention.blocksparse`, the XLA twin of these kernels):

  q [B, Tp, N, Hp], k, v [B, Sp, K, Hp]     Tp, Sp multiples of the tile C; Hp = 64, 128, 256, ...
  q_pos [1|B, 1|N, Tp], k_pos [1|B, 1|K, Sp]  original position of each slot, -1 = nothing there
  q_seg, k_seg                                segment ids in the same shapes, or None
  blocks, flags [L, Nq, V], count [L, Nq]     query tile i visits key tiles blocks[l, i, :count]; a
                                              slot with flags 1 applies `pattern`; L = 1 or N

A pair (query slot, key slot) is allowed when both positions are >= 0, `Mask.allowed` passes on
(positions, segment ids), and, in a flagged slot, pattern(q_pos, k_pos, head) holds. Tiles are
skipped in two ways: a layout lists only the tiles it needs (a causal dense layout stops at the
diagonal), and a visited tile whose pairs are all disallowed (another packed sequence, padding) is
not multiplied. Shared-QK attention (Reformer) gives a query's own key the logit `self_logit`.

Block shapes: the tile C is the layout's block (the model's layouts use 16 ... 128); the lane axis
is the head dimension, padded to a power of two >= 64 (Triton loads power-of-two tiles). The
kernels were run in interpret mode on the CPU and lowered to Triton for CUDA
(tests/kernels/test_lowering.py); see the README for what ran where.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from efflong import errors, kernels
from efflong.mask import NEG_INF, Mask, Pattern

DTYPES = (jnp.float32, jnp.bfloat16)

@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
  """What the kernels need besides arrays (static; hashed by identity).

  Attributes:
    block: C, the tile length of queries and keys.
    blocks, flags, count: the layout, compacted (visited tiles first); see the module docstring.
    pattern: the in-tile mask of flagged slots, or None.
    causal, q_len, kv_len: the mask's causal flag and the original T and S (causal alignment).
    scale: logit scale.
    self_logit: the logit of a query's own key (q_pos == k_pos), or None for no such rule.
    interpret: run the kernels in Pallas' interpreter.
  """

  block: int
  blocks: np.ndarray
  flags: np.ndarray
  count: np.ndarray
  pattern: Pattern | None
  causal: bool
  q_len: int
  kv_len: int
  scale: float
  interpret: bool
  self_logit: float | None = None

  @functools.cached_property
  def transposed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(blocks, flags, count) of the transposed layout: key tile j's visiting query tiles."""
    lh, nq, _ = self.blocks.shape
    nk = int(self.blocks.max()) + 1 if self.blocks.size else 1
    lists = [[[] for _ in range(nk)] for _ in range(lh)]
    for l in range(lh):
      for i in range(nq):
        for v in range(self.count[l, i]):
          lists[l][self.blocks[l, i, v]].append((i, self.flags[l, i, v]))
    most = max(1, max(len(x) for row in lists for x in row))
    blocks, flags = np.zeros((lh, nk, most), np.int32), np.zeros((lh, nk, most), np.int32)
    count = np.zeros((lh, nk), np.int32)
    for l, row in enumerate(lists):
      for j, visits in enumerate(row):
        count[l, j] = len(visits)
        for u, (i, f) in enumerate(visits):
          blocks[l, j, u], flags[l, j, u] = i, f
    return blocks, flags, count


def compact(kv_blocks: np.ndarray, use: np.ndarray, flags: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Moves each query tile's visited slots to the front.

  Args:
    kv_blocks: [L, Nq, V] key tile of each slot.
    use: [L, Nq, V] bool, the slot is visited.
    flags: [L, Nq, V] bool, the slot applies the pattern.
  Returns:
    blocks [L, Nq, V], flags [L, Nq, V] (0 or 1) and count [L, Nq], int32.
  """
  order = np.argsort(~use, axis=-1, kind='stable')
  take = lambda x: np.take_along_axis(x, order, axis=-1).astype(np.int32)
  return take(kv_blocks), take(flags & use), np.count_nonzero(use, axis=-1).astype(np.int32)


def padded_head_dim(h: int) -> int:
  """The lane width the kernels compute with: a power of two, at least 64."""
  return kernels.pow2(h, 64)


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, spec: Spec, positions: dict[str, Any]
                 ) -> None:
  """One-line ValueErrors for what the kernels cannot take (see `attend_slots` for the shapes)."""
  if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in DTYPES:
    raise errors.Error(f'Pallas attention takes float32 or bfloat16 q, k, v of one dtype; got '
                       f'{q.dtype}, {k.dtype}, {v.dtype}.')
  b, tp, n, h = q.shape
  if k.ndim != 4 or k.shape != v.shape or (k.shape[0], k.shape[3]) != (b, h):
    raise errors.Error(f'Pallas attention: k and v must be [B={b}, S, K, H={h}]; got k {k.shape}, '
                       f'v {v.shape}.')
  sp, kh = k.shape[1], k.shape[2]
  if n % kh:
    raise errors.Error(f'Pallas attention: key/value heads K={kh} must divide query heads N={n}; '
                       f'valid K: {[d for d in range(1, n + 1) if n % d == 0]}.')
  c = spec.block
  if not spec.interpret and c != kernels.pow2(c, 16):
    raise errors.Error(f"Pallas attention on the GPU needs a tile (the family's block or "
                       f'bucket_size) that is a power of two >= 16; got {c}.')
  lh, nq, nv = spec.blocks.shape
  if tp != nq * c or sp % c or lh not in (1, n) or spec.blocks.max(initial=0) * c >= sp:
    raise errors.Error(f'layout [L={lh}, {nq}, {nv}] x block {c} does not fit q {q.shape} and k '
                       f'{k.shape}: it needs T = {nq * c}, S a multiple of {c} above '
                       f'{spec.blocks.max(initial=0) * c}, L = 1 or {n}.')
  if (positions['q_seg'] is None) != (positions['k_seg'] is None):
    raise errors.Error('Pallas attention needs both q_seg and k_seg, or neither.')
  for name, x in positions.items():
    length, heads = (tp, n) if name.startswith('q') else (sp, kh)
    if x is not None and (x.ndim != 3 or x.shape[0] not in (1, b) or x.shape[1] not in (1, heads)
                          or x.shape[2] != length):
      raise errors.Error(f'Pallas attention: {name} has shape {tuple(x.shape)}; expected '
                         f'[1 or {b}, 1 or {heads}, {length}].')


# ----------------------------------------------------------------------------- the in-tile math


def _allowed(spec: Spec, qp: jax.Array, kp: jax.Array, qs: jax.Array | None,
             ks: jax.Array | None, flag: jax.Array, head: jax.Array) -> jax.Array:
  """[Cq, Ck] allowed pairs of a tile, from positions, ids and the slot's flag (no logits)."""
  qp, kp = qp[:, None], kp[None, :]
  ok = (qp >= 0) & (kp >= 0) & Mask(causal=spec.causal).allowed(
      qp, kp, None if qs is None else qs[:, None], None if ks is None else ks[None, :],
      spec.q_len, spec.kv_len)
  if spec.pattern is not None:
    ok = ok & ((flag == 0) | spec.pattern(qp, kp, head))
  return ok


def _logits(spec: Spec, q: jax.Array, k: jax.Array, qp: jax.Array, kp: jax.Array,
            ok: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scaled logits [Cq, Ck] float32 (NEG_INF where not allowed) and the pairs with a gradient."""
  s = kernels.dot(q, k, (1, 1)) * spec.scale
  if spec.self_logit is None:
    return jnp.where(ok, s, NEG_INF), ok
  own = qp[:, None] == kp[None, :]
  return jnp.where(ok, jnp.where(own, spec.self_logit, s), NEG_INF), ok & ~own


def _any(ok: jax.Array) -> jax.Array:
  return jnp.max(ok.astype(jnp.int32)) > 0


# ----------------------------------------------------------------------------- kernels
# Refs arrive as: layout (blocks, flags, count), q, k, v, q_pos, k_pos, [q_seg, k_seg], extras,
# outputs. In the forward and dq kernels the program's fixed tile is a query tile and it walks key
# tiles; in the dk/dv kernel the other way round (over the transposed layout).

Refs = tuple[Any, ...]


def _split(refs: Refs, has_seg: bool, extras: int) -> tuple[Refs, Refs, Refs, Refs, Refs]:
  """(layout, (q, k, v, q_pos, k_pos), (q_seg, k_seg) or Nones, extras, outputs)."""
  layout, arrays, rest = refs[:3], refs[3:8], refs[8:]
  seg, rest = (rest[:2], rest[2:]) if has_seg else ((None, None), rest)
  return layout, arrays, seg, rest[:extras], rest[extras:]


def _read(ref: Any, *index: Any) -> jax.Array | None:
  return None if ref is None else ref[index]


def _walk(spec: Spec, layout: Refs, head: jax.Array, own: tuple, other: Callable[..., tuple], *,
          query_tile: bool, step: Callable[..., Any], init: Any) -> Any:
  """Folds step over the tiles the program's tile (grid axis 2) visits, skipping those with no
  allowed pair.

  Args:
    spec: static parameters.
    layout: (blocks, flags, count) refs: the layout, or its transpose for key tiles.
    head: the query head (its layout row and the pattern's head argument).
    own: (positions [C], segment ids [C] or None) of the program's tile.
    other: rows (a pl.ds) -> (positions, segment ids) of a visited tile.
    query_tile: the program's tile holds queries (else keys).
    step: (rows, q_pos, k_pos, ok [Cq, Ck], carry) -> carry, for each visited tile.
    init: the initial carry.
  """
  blocks, flags, count = layout
  i, c = pl.program_id(2), spec.block
  l = head if spec.blocks.shape[0] > 1 else 0

  def visit(slot, carry):
    rows = pl.ds(blocks[l, i, slot] * c, c)
    theirs = other(rows)
    (qp, qs), (kp, ks) = (own, theirs) if query_tile else (theirs, own)
    ok = _allowed(spec, qp, kp, qs, ks, flags[l, i, slot], l)  # head as in the XLA twin
    return jax.lax.cond(_any(ok), lambda x: step(rows, qp, kp, ok, x), lambda x: x, carry)

  return jax.lax.fori_loop(0, count[l, i], visit, init)


def _query_walk(spec: Spec, layout: Refs, pos: Refs, seg: Refs, *, step: Callable[..., Any],
                init: Any) -> Any:
  """_walk for the forward and dq kernels: grid (B, N, Nq), a query tile over its key tiles."""
  (qpos, kpos), (qseg, kseg) = pos, seg
  return _walk(spec, layout, pl.program_id(1), (qpos[...], _read(qseg, slice(None))),
               lambda rows: (kpos[rows], _read(kseg, rows)), query_tile=True, step=step,
               init=init)


def _forward_kernel(spec: Spec, has_seg: bool, *refs: Any) -> None:
  """Grid (B, N, Nq): one query tile against its key tiles (FlashAttention-2, Alg. 1)."""
  layout, (q_ref, k_ref, v_ref, *pos), seg, _, (out_ref, lse_ref) = _split(refs, has_seg, 0)
  q, c = q_ref[...], spec.block

  def step(keys, qp, kp, ok, carry):
    m, total, acc = carry
    s, _ = _logits(spec, q, k_ref[keys, :], qp, kp, ok)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
    rescale = jnp.exp(m - m_new)
    acc = acc * rescale[:, None] + kernels.dot(p.astype(v_ref.dtype), v_ref[keys, :], (1, 0))
    return m_new, total * rescale + jnp.sum(p, axis=1), acc

  init = (jnp.full((c,), NEG_INF, jnp.float32), jnp.zeros((c,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, total, acc = _query_walk(spec, layout, pos, seg, step=step, init=init)
  seen = total > 0
  out_ref[...] = acc / jnp.where(seen, total, 1.0)[:, None]
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), NEG_INF)


def _dq_kernel(spec: Spec, has_seg: bool, *refs: Any) -> None:
  """Grid (B, N, Nq): dq of one query tile (FlashAttention-2, Alg. 2, the dq half).

  With P = exp(S - lse), dS = P * (dO V^T - delta), delta = rowsum(dO * O) - dlse; dq = scale dS K.
  """
  layout, (q_ref, k_ref, v_ref, *pos), seg, (do_ref, lse_ref, delta_ref), (dq_ref,) = _split(
      refs, has_seg, 3)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(keys, qp, kp, ok, dq):
    k = k_ref[keys, :]
    s, grad = _logits(spec, q, k, qp, kp, ok)
    p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
    ds = jnp.where(grad, p * (kernels.dot(do, v_ref[keys, :], (1, 1)) - delta[:, None]), 0.0)
    return dq + kernels.dot(ds.astype(k.dtype), k, (1, 0))

  dq = _query_walk(spec, layout, pos, seg, step=step, init=jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq * spec.scale


def _dkv_kernel(spec: Spec, has_seg: bool, *refs: Any) -> None:
  """Grid (B, K, Nk): dk, dv of one key tile (Alg. 2, the dk/dv half), summed on chip over the G
  query heads of its kv head. dV = P^T dO, dK = scale dS^T Q.

  q and dO arrive as [Tp, G, Hp], lse and delta as [G, Tp], query positions and ids as [G or 1, Tp].
  """
  layout, (q_ref, k_ref, v_ref, qpos, kpos), (qseg, kseg), (do_ref, lse_ref, delta_ref), (
      dk_ref, dv_ref) = _split(refs, has_seg, 3)
  k, v, groups = k_ref[...], v_ref[...], q_ref.shape[1]
  own = (kpos[...], _read(kseg, slice(None)))
  carry = (jnp.zeros(k.shape, jnp.float32),) * 2
  for g in range(groups):
    row = lambda ref, g=g: g if ref.shape[0] > 1 else 0    # a query head's row of [G or 1, Tp]

    def step(rows, qp, kp, ok, carry, g=g):
      dk, dv = carry
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      s, grad = _logits(spec, q, k, qp, kp, ok)
      p = jnp.where(ok, jnp.exp(s - lse_ref[g, rows][:, None]), 0.0)
      dv = dv + kernels.dot(p.astype(do.dtype), do, (0, 0))
      ds = jnp.where(grad, p * (kernels.dot(do, v, (1, 1)) - delta_ref[g, rows][:, None]), 0.0)
      return dk + kernels.dot(ds.astype(q.dtype), q, (0, 0)), dv

    other = lambda rows, row=row: (qpos[row(qpos), rows],
                                   None if qseg is None else qseg[row(qseg), rows])
    carry = _walk(spec, layout, pl.program_id(1) * groups + g, own, other, query_tile=False,
                  step=step, init=carry)
  dk_ref[...] = carry[0] * spec.scale
  dv_ref[...] = carry[1]


# ----------------------------------------------------------------------------- pallas_call wrappers


def _specs(spec: Spec, q: jax.Array, k: jax.Array, rows: tuple, extras: int, *, query_tile: bool,
           layout: tuple) -> list[pl.BlockSpec]:
  """BlockSpecs of (layout, q, k, v, q_pos, k_pos, [q_seg, k_seg], extras).

  query_tile: grid (B, N, Nq), a query tile and the whole key side of its kv head. Else grid
  (B, K, Nk): a key tile and the whole query side of the kv head's G query heads.
  rows: (q_pos, k_pos) and the segment ids if any, each [1|B, 1|heads, L].
  """
  c, (tp, n, hp), (sp, kh) = spec.block, q.shape[1:], k.shape[1:3]
  g = n // kh
  whole = lambda a: pl.BlockSpec(a.shape, lambda b, h, i: (0,) * a.ndim)
  batch = lambda a, b: b if a.shape[0] > 1 else 0
  if query_tile:
    kv_head = lambda h: h // g
    q_side = pl.BlockSpec((None, c, None, hp), lambda b, h, i: (b, i, h, 0))
    k_side = pl.BlockSpec((None, sp, None, hp), lambda b, h, i: (b, 0, kv_head(h), 0))
    q_row = lambda a: pl.BlockSpec((None, None, c), lambda b, h, i: (
        batch(a, b), h if a.shape[1] > 1 else 0, i))
    k_row = lambda a: pl.BlockSpec((None, None, sp), lambda b, h, i: (
        batch(a, b), kv_head(h) if a.shape[1] > 1 else 0, 0))
    stats = pl.BlockSpec((None, None, c), lambda b, h, i: (b, h, i))
  else:
    q_side = pl.BlockSpec((None, tp, g, hp), lambda b, h, j: (b, 0, h, 0))
    k_side = pl.BlockSpec((None, c, None, hp), lambda b, h, j: (b, j, h, 0))
    q_row = lambda a: pl.BlockSpec((None, g if a.shape[1] > 1 else 1, tp), lambda b, h, j: (
        batch(a, b), h if a.shape[1] > 1 else 0, 0))
    k_row = lambda a: pl.BlockSpec((None, None, c), lambda b, h, j: (
        batch(a, b), h if a.shape[1] > 1 else 0, j))
    stats = pl.BlockSpec((None, g, tp), lambda b, h, j: (b, h, 0))
  sides = [q_row, k_row] * (len(rows) // 2)
  return ([whole(a) for a in layout] + [q_side, k_side, k_side]
          + [side(a) for side, a in zip(sides, rows)] + [q_side, stats, stats][:extras])


def _call(spec: Spec, kernel: Callable, layout: tuple, arrays: tuple, extras: tuple = (), *,
          query_tile: bool, outputs: tuple[str, ...]) -> list[jax.Array]:
  """One kernel, each device on its own batch rows (`kernels.batch_sharded`).

  Args:
    spec: static parameters.
    kernel: _forward_kernel, _dq_kernel (grid (B, N, Nq)) or _dkv_kernel (grid (B, K, Nk)).
    layout: (blocks, flags, count) arrays: the layout, or for the dk/dv kernel its transpose.
    arrays: (q, k, v, q_pos, k_pos) and, with segment ids, (q_seg, k_seg).
    extras: () or the backward's (do [B, Tp, N, Hp], lse [B, N, Tp], delta [B, N, Tp]).
    query_tile: the grid walks query tiles (forward, dq) or key tiles (dk/dv).
    outputs: per output, 'seq' ([B, L, heads, Hp] float32, L the walked length) or 'stats'
      ([B, N, L] float32).
  """
  has_seg = len(arrays) == 7

  def call(*args):
    q, k = args[3], args[4]
    b, hp = q.shape[0], q.shape[3]
    heads, length = (q.shape[2], q.shape[1]) if query_tile else (k.shape[2], k.shape[1])
    tile = pl.BlockSpec((None, spec.block, None, hp), lambda b, h, i: (b, i, h, 0))
    kinds = {'seq': (tile, (b, length, heads, hp)),
             'stats': (pl.BlockSpec((None, None, spec.block), lambda b, h, i: (b, h, i)),
                       (b, heads, length))}
    return pl.pallas_call(
        functools.partial(kernel, spec, has_seg),
        grid=(b, heads, length // spec.block),
        in_specs=_specs(spec, q, k, args[6:3 + len(arrays)], len(extras), query_tile=query_tile,
                        layout=args[:3]),
        out_specs=[kinds[o][0] for o in outputs],
        out_shape=[jax.ShapeDtypeStruct(kinds[o][1], jnp.float32) for o in outputs],
        interpret=spec.interpret, compiler_params=kernels.triton(4 if hp <= 64 else 8),
        name=kernel.__name__.strip('_'),
    )(*args)

  batched = [False] * 3 + [True] * 3 + [x.shape[0] > 1 for x in arrays[3:]] + [True] * len(extras)
  return kernels.batch_sharded(call, (*layout, *arrays, *extras), batched)


def _arrays(q, k, v, qpos, kpos, qseg, kseg) -> tuple:
  return (q, k, v, qpos, kpos) + (() if qseg is None else (qseg, kseg))


def _layout(spec: Spec, transposed: bool = False) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(x) for x in (spec.transposed if transposed else
                                        (spec.blocks, spec.flags, spec.count)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: Spec, q, k, v, qpos, kpos, qseg, kseg) -> tuple[jax.Array, jax.Array]:
  return _flash_fwd(spec, q, k, v, qpos, kpos, qseg, kseg)[0]


def _flash_fwd(spec, q, k, v, qpos, kpos, qseg, kseg):
  out, lse = _call(spec, _forward_kernel, _layout(spec), _arrays(q, k, v, qpos, kpos, qseg, kseg),
                   query_tile=True, outputs=('seq', 'stats'))
  return (out, lse), (q, k, v, qpos, kpos, qseg, kseg, out, lse)


def _flash_bwd(spec, residuals, cotangents):
  q, k, v, qpos, kpos, qseg, kseg, out, lse = residuals
  dout, dlse = cotangents
  arrays = _arrays(q, k, v, qpos, kpos, qseg, kseg)
  # dlse enters like a softmax output's: d lse / d s = P, so it shifts delta (Alg. 2, line 19).
  delta = jnp.einsum('BTNH,BTNH->BNT', dout, out) - dlse
  extras = (dout.astype(q.dtype), lse, delta)
  dq, = _call(spec, _dq_kernel, _layout(spec), arrays, extras, query_tile=True, outputs=('seq',))
  transposed = _layout(spec, transposed=True)
  nk = k.shape[1] // spec.block
  if transposed[0].shape[1] < nk:  # key tiles no query visits: pad the layout with empty rows.
    transposed = tuple(jnp.pad(x, [(0, 0), (0, nk - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
                       for x in transposed)
  dk, dv = _call(spec, _dkv_kernel, transposed, arrays, extras, query_tile=False,
                 outputs=('seq', 'seq'))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- entry points


def attend_slots(q: jax.Array, k: jax.Array, v: jax.Array, *, spec: Spec, q_pos: jax.Array,
                 k_pos: jax.Array, q_seg: jax.Array | None = None,
                 k_seg: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention over inputs already in slot order.

  Args:
    q: [B, Tp, N, H], Tp a multiple of spec.block; float32 or bfloat16.
    k, v: [B, Sp, K, H] in q's dtype; K divides N.
    spec: the layout and the mask's static part.
    q_pos: [1|B, 1|N, Tp] int32 original positions (-1: no query); k_pos [1|B, 1|K, Sp] likewise.
    q_seg, k_seg: segment ids shaped like q_pos, k_pos, or None.
  Returns:
    out [B, Tp, N, H] float32 (zeros for a query that sees nothing) and lse [B, Tp, N] float32
    (NEG_INF there); both differentiable (custom_vjp: the dq and dk/dv kernels).
  """
  check_inputs(q, k, v, spec, dict(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg))
  h = q.shape[3]
  hp = padded_head_dim(h)
  pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, hp - h)]) if hp != h else x
  as_int = lambda x: None if x is None else x.astype(jnp.int32)
  out, lse = _flash(spec, pad(q), pad(k), pad(v), as_int(q_pos), as_int(k_pos), as_int(q_seg),
                    as_int(k_seg))
  return out[..., :h], jnp.moveaxis(lse, 1, 2)
