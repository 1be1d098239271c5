"""Softmax attention (Vaswani et al. 2017): every other family is tested against it.

Two XLA paths compute it, twins of each other (tests/attention/test_dense_blocked.py):

- explicit (`reference`, `attend_allowed`): the T x S logits, masked and normalised at once.
  O(T * S) time and memory; the slow, obviously correct reference.
- blocked (`blocked`): FlashAttention's recurrence (Dao et al. 2022, Alg. 1; Dao 2023, Alg. 1) in
  XLA loops. Queries and keys are cut into blocks of C; for each query block a loop over key
  blocks folds each block's logits into a running max, sum and weighted value sum (the online
  softmax of Milakov & Gimelshein 2018: `init_state`, `block_update`, `finish`). A custom VJP
  keeps only the output and the row log-sum-exp and recomputes each block's probabilities in the
  backward (Dao 2023, Alg. 2), so memory is O(T + S) and time O(T * S) in matmuls of a C x C block
  (all heads at once). Causal attention visits only the key blocks at or before each query block's
  last position; with segment ids, a block pair whose segments cannot meet is skipped and one that
  lies inside a single segment is not masked.

`attend` (impl 'xla') runs the blocked path with blocks of BLOCK queries and keys when T or S
exceeds BLOCK, and the explicit one otherwise (a single block: the same arithmetic, less machinery).

impl='pallas' runs the FlashAttention kernels instead (efflong.kernels.flash_attention).
Decoding keeps every key and value in a preallocated cache (init_cache / attend_step, shared by the
sparse families); a step runs the same two paths over the cache.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from efflong import errors, kernels
from efflong.attention import blocksparse
from efflong.mask import NEG_INF, Mask, softmax

# Default block size C of the blocked path (queries and keys): the C x C logit block of every head
# of a kv group is one matmul. On a 2-core CPU, forward + backward at 16K: 256 ran 6% faster than
# 128 and 8-10% faster than 512 (experiments/bench/dense_blocked.py).
BLOCK = 256

# A running max starts here: below any real logit, above a masked one (NEG_INF), so a block in which
# a row sees nothing adds exp(NEG_INF - FLOOR) = 0 to its sum and the row stays empty.
FLOOR = NEG_INF / 2

# What a (query block, key block) pair needs; the kinds possible for a call are always a prefix.
FULL, MASKED, SKIP = 0, 1, 2

State = tuple[jax.Array, jax.Array, jax.Array]


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> None:
  """Raises ValueError on q/k/v/mask shapes that do not fit [B, T, N, H] / [B, S, K, H]."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise errors.Error(f'q, k, v must be [B, T, N, H] / [B, S, K, H]; got ranks {q.ndim}, '
                       f'{k.ndim}, {v.ndim}.')
  b, t, n, h = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise errors.Error(f'k and v must be [B={b}, S, K, H={h}]; got k {k.shape}, v {v.shape}.')
  if n % k.shape[2]:
    raise errors.Error(f'Key/value heads K={k.shape[2]} must divide query heads N={n}.')
  mask.check(b, t, k.shape[1])


def attend_allowed(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                   scale: float, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax attention under an explicit boolean mask, with its statistics.

  Args:
    q: [B, T, N, H].
    k, v: [B, S, K, H]; K divides N.
    allowed: [B|1, N|1, T, S] bool.
    scale: logit scale.
    bias: [B|1, N, T, S] float32 added to the scaled logits (relative positions), or None.
  Returns:
    out [B, T, N, H] float32 (zeros for a row that sees nothing) and lse [B, T, N] float32.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]: G query heads share one kv head.
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.reshape(bias.shape[0], kh, n // kh, t, -1)
  a = allowed
  a = a.reshape(a.shape[0], *((kh, n // kh) if a.shape[1] == n else (1, 1)), *a.shape[2:])
  probs, total, lse = softmax(logits, a)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out / jnp.moveaxis(total, 3, 1)[..., None]
  return out.reshape(b, t, n, h), jnp.moveaxis(lse, 3, 1).reshape(b, t, n)


# The online softmax, one key block at a time (Milakov & Gimelshein 2018; Dao et al. 2022, Alg. 1).


def init_state(rows: tuple[int, ...], h: int) -> State:
  """The online softmax's state before any key: (max, sum, acc) for rows [...] of head dim H.

  Returns:
    m [...] float32 running max (FLOOR), l [...] float32 running sum of exp(logit - m) (0) and
    acc [..., H] float32 running sum of exp(logit - m) * value (0).
  """
  return (jnp.full(rows, FLOOR, jnp.float32), jnp.zeros(rows, jnp.float32),
          jnp.zeros((*rows, h), jnp.float32))


def block_update(state: State, logits: jax.Array, v: jax.Array) -> State:
  """Folds one block of keys into the online softmax's state.

  The state is rescaled to the new running max m' = max(m, max logits): l' = l e^(m - m') +
  sum e^(logits - m'), acc' = acc e^(m - m') + e^(logits - m') v. Rows of `logits` are independent,
  so any leading axes (batch, heads) go along.

  Args:
    state: (m [..., M], l [..., M], acc [..., M, H]) from `init_state` or a previous update.
    logits: [..., M, C] float32 scaled logits of the block's C keys, NEG_INF where not allowed.
    v: [..., C, H] the block's values.
  Returns:
    The state after the block.
  """
  m, l, acc = state
  top = jnp.maximum(m, jnp.max(logits, axis=-1))
  p = jnp.exp(logits - top[..., None])
  rescale = jnp.exp(m - top)
  acc = acc * rescale[..., None] + _dot(p.astype(v.dtype), v)
  return top, l * rescale + jnp.sum(p, axis=-1), acc


def finish(state: State) -> tuple[jax.Array, jax.Array]:
  """out [..., M, H] = acc / l and lse [..., M] = m + log l (a row that saw no key: 0, NEG_INF)."""
  m, l, acc = state
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  return acc / l[..., None], jnp.where(seen, m + jnp.log(l), NEG_INF)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """[..., M, K] @ [..., K, N] -> [..., M, N] float32, the leading axes batch (both operands in
  the layout the CPU's matmul reads directly: no transposes inside the loops)."""
  batch = tuple(range(a.ndim - 2))
  return lax.dot_general(a, b, (((a.ndim - 1,), (a.ndim - 2,)), (batch, batch)),
                         preferred_element_type=jnp.float32)


class _Spec(NamedTuple):
  """The static part of a blocked call: causal, S, G = N // K, block sizes."""
  causal: bool
  kv_len: int
  groups: int
  q_block: int
  kv_block: int


class _Blocks(NamedTuple):
  """A blocked call's inputs in block layout (Nq = ceil(T / Cq), Nk = ceil(S / Ck); G = N // K).

  q: [Nq, B, K, G * Cq, H] times the logit scale (row g * Cq + c: head g of the group, position c
    of the block).
  k, v: [Nk, B, K, Ck, H].
  q_pos: [Nq, B|1, Cq] int32 query positions on the key axis (padding -1).
  q_seg: [Nq, B, Cq] int32, or None.
  k_seg: [Nk, B, Ck] int32, or None.
  """
  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_pos: jax.Array
  q_seg: jax.Array | None
  k_seg: jax.Array | None


def _allowed(spec: _Spec, q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
             k_seg: jax.Array | None) -> jax.Array:
  """Which (query, key) pairs of a block pair are allowed (broadcasting): the key exists, is not
  in a causal query's future and shares its segment."""
  ok = k_pos < spec.kv_len
  if spec.causal:
    ok = ok & (k_pos <= q_pos)
  if q_seg is not None:
    ok = ok & (q_seg == k_seg)
  return ok


def _reach(spec: _Spec, x: _Blocks) -> jax.Array:
  """[Nq] int32: query block i visits key blocks [0, reach[i]) (causal: up to its last query)."""
  nk = x.k.shape[0]
  if not spec.causal:
    return jnp.full(x.q.shape[0], nk, jnp.int32)
  return jnp.clip(jnp.max(x.q_pos, axis=(1, 2)) // spec.kv_block + 1, 0, nk).astype(jnp.int32)


def _kinds(spec: _Spec, x: _Blocks) -> tuple[jax.Array, int]:
  """[Nq, Nk] int32 kind of every block pair (FULL, MASKED, SKIP) and how many kinds can occur.

  FULL: every pair allowed (no mask to apply); SKIP: none (segments that cannot meet in any row);
  MASKED: the rest. Padding query rows (position -1) make their block MASKED, harmlessly.
  """
  nk, ck = x.k.shape[0], spec.kv_block
  start = jnp.arange(nk) * ck
  full = jnp.broadcast_to(start + ck <= spec.kv_len, (x.q.shape[0], nk))
  kinds = 1 + (spec.causal or nk * ck != spec.kv_len)
  if spec.causal:
    full = full & (start + ck - 1 <= jnp.min(x.q_pos, axis=(1, 2))[:, None])
  skip = jnp.zeros_like(full)
  if x.q_seg is not None:
    q_lo, q_hi = jnp.min(x.q_seg, axis=2)[:, None], jnp.max(x.q_seg, axis=2)[:, None]  # [Nq, 1, B]
    k_lo, k_hi = jnp.min(x.k_seg, axis=2)[None], jnp.max(x.k_seg, axis=2)[None]        # [1, Nk, B]
    skip = jnp.all((q_hi < k_lo) | (k_hi < q_lo), axis=2)
    full = full & jnp.all((q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo), axis=2)
    kinds = 3
  return jnp.where(skip, SKIP, jnp.where(full, FULL, MASKED)).astype(jnp.int32), kinds


def _switch(kind: jax.Array, kinds: int, full: Callable, masked: Callable, skip: Callable):
  """full(), masked() or skip() by kind, branching only over the kinds that can occur."""
  branches = (full, masked, skip)[:kinds]
  return branches[0]() if kinds == 1 else lax.switch(kind, branches)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: _Spec, x: _Blocks) -> tuple[jax.Array, jax.Array]:
  """Blocked attention in block layout: out [Nq, B, K, G * Cq, H], lse [Nq, B, K, G * Cq]."""
  return _flash_fwd(spec, x)[0]


def _flash_fwd(spec: _Spec, x: _Blocks):
  """For each query block, a loop over its key blocks (Dao 2023, Alg. 1)."""
  b, kh, gc, h = x.q.shape[1:]
  g, cq, ck = spec.groups, spec.q_block, spec.kv_block
  k_t = jnp.swapaxes(x.k, -1, -2)                                    # [Nk, B, K, H, Ck]
  kind, kinds = _kinds(spec, x)

  def query_block(_, xs):
    q, q_pos, q_seg, reach, kind = xs

    def key_block(j, state):
      def update(masked):
        s = _dot(q, k_t[j])                                             # [B, K, G * Cq, Ck]
        if masked:
          segs = (None, None) if q_seg is None else (q_seg[:, None, None, :, None],
                                                     x.k_seg[j][:, None, None, None, :])
          ok = _allowed(spec, q_pos[:, None, None, :, None], j * ck + jnp.arange(ck), *segs)
          s = jnp.where(ok, s.reshape(b, kh, g, cq, ck), NEG_INF).reshape(s.shape)
        return block_update(state, s, x.v[j])
      return _switch(kind[j], kinds, lambda: update(False), lambda: update(True), lambda: state)

    return None, finish(lax.fori_loop(0, reach, key_block, init_state((b, kh, gc), h)))

  xs = (x.q, x.q_pos, x.q_seg, _reach(spec, x), kind)
  _, (out, lse) = lax.scan(query_block, None, xs)
  return (out, lse), (x, out, lse)


def _flash_bwd(spec: _Spec, res, cotangents):
  """For each key block, a loop over the query blocks that see it, recomputing the probabilities
  from the saved log-sum-exp (Dao 2023, Alg. 2), in the keys-by-queries orientation so every
  matmul reads its operands as stored. dq accumulates in place, transposed [Nq, B, K, H, G * Cq].
  A cotangent of lse adds to the logits' gradient: d lse / d logit = p."""
  x, out, lse = res
  d_out, d_lse = cotangents
  nq, b, kh, gc, h = x.q.shape
  g, cq, ck = spec.groups, spec.q_block, spec.kv_block
  # An einsum, not sum(d_out * out): XLA:CPU runs that product-then-reduce ~15x slower.
  delta = jnp.einsum('...H,...H->...', d_out, out) - d_lse            # [Nq, B, K, G * Cq]
  lse = jnp.where(lse > FLOOR, lse, 0.0)  # An empty row: every logit NEG_INF, so p = 0.
  d_out = d_out.astype(x.v.dtype)
  q_t, d_out_t = jnp.swapaxes(x.q, -1, -2), jnp.swapaxes(d_out, -1, -2)   # [Nq, B, K, H, G * Cq]
  k_t = jnp.swapaxes(x.k, -1, -2)
  reach = _reach(spec, x)
  first = jnp.sum(reach[None, :] <= jnp.arange(x.k.shape[0])[:, None], axis=1)  # [Nk]
  kind, kinds = _kinds(spec, x)

  def key_block(dq_t, xs):
    k, k_t, v, k_seg, j, first, kind = xs

    def query_block(i, carry):
      dk, dv, dq_t = carry

      def grads(masked):
        s = _dot(k, q_t[i])                                             # [B, K, Ck, G * Cq]
        if masked:
          segs = (None, None) if k_seg is None else (x.q_seg[i][:, None, None, None, :],
                                                     k_seg[:, None, :, None, None])
          ok = _allowed(spec, x.q_pos[i][:, None, None, None, :],
                        (j * ck + jnp.arange(ck))[:, None, None], *segs)
          s = jnp.where(ok, s.reshape(b, kh, ck, g, cq), NEG_INF).reshape(s.shape)
        p = jnp.exp(s - lse[i][:, :, None, :])
        ds = p * (_dot(v, d_out_t[i]) - delta[i][:, :, None, :])
        ds = ds.astype(x.q.dtype)
        return _dot(ds, x.q[i]), _dot(p.astype(v.dtype), d_out[i]), _dot(k_t, ds)

      def none():
        zero = jnp.zeros((b, kh, ck, h), jnp.float32)
        return zero, zero, jnp.zeros((b, kh, h, gc), jnp.float32)

      ddk, ddv, ddq_t = _switch(kind[i], kinds, lambda: grads(False), lambda: grads(True), none)
      return dk + ddk, dv + ddv, dq_t.at[i].add(ddq_t)

    zero = jnp.zeros((b, kh, ck, h), jnp.float32)
    dk, dv, dq_t = lax.fori_loop(first, nq, query_block, (zero, zero, dq_t))
    return dq_t, (dk, dv)

  xs = (x.k, k_t, x.v, x.k_seg, jnp.arange(x.k.shape[0]), first, kind.T)
  dq_t, (dk, dv) = lax.scan(key_block, jnp.zeros((nq, b, kh, h, gc), jnp.float32), xs)
  dq = jnp.swapaxes(dq_t, -1, -2)
  return (_Blocks(dq.astype(x.q.dtype), dk.astype(x.k.dtype), dv.astype(x.v.dtype),
                  None, None, None),)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _to_blocks(x: jax.Array, c: int, fill: int = 0) -> jax.Array:
  """x [B, L, ...] -> [ceil(L / C), B, C, ...], the tail padded with fill."""
  n = -(-x.shape[1] // c)
  x = jnp.pad(x, ((0, 0), (0, n * c - x.shape[1])) + ((0, 0),) * (x.ndim - 2),
              constant_values=fill)
  return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)


def blocked(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
            q_seg: jax.Array | None = None, k_seg: jax.Array | None = None, causal: bool,
            scale: float, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
  """Softmax attention over blocks of keys, O(T + S) memory, differentiable (module docstring).

  Key s sits at position s; a query sees key s when s <= its position (if causal) and their
  segment ids are equal (if given). T and S need not divide by the block (the tails are padded and
  masked); a length shorter than the block is one block.

  Args:
    q: [B, T, N, H].
    k, v: [B, S, K, H]; K divides N.
    q_pos: [B|1, T] int, each query's position on the key axis (self-attention: arange(T); the
      queries of a later chunk: their offset from the keys' first position, plus arange(T)).
    q_seg: [B, T] int segment ids of the queries, or None (with k_seg).
    k_seg: [B, S] int segment ids of the keys, or None (with q_seg).
    causal: whether a query is barred from keys after its position.
    scale: logit scale.
    block: C, the number of queries and of keys per block (> 0).
  Returns:
    out [B, T, N, H] float32 (zeros for a query that sees no key) and lse [B, T, N] float32, the
    log-sum-exp of each query's allowed logits (NEG_INF for none): merge parts over disjoint keys
    with `blocksparse.merge`. Both are differentiable.
  """
  if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
    raise errors.Error(f'block={block!r} must be a positive integer.')
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  spec = _Spec(causal, s, g, min(block, t), min(block, s))
  # Scaled once here, not each logit block (autodiff scales dq).
  qb = _to_blocks((q * scale).reshape(b, t, kh, g, h), spec.q_block)  # [Nq, B, Cq, K, G, H]
  nq = qb.shape[0]
  qb = qb.transpose(0, 1, 3, 4, 2, 5).reshape(nq, b, kh, g * spec.q_block, h)
  x = _Blocks(qb, *(jnp.swapaxes(_to_blocks(a, spec.kv_block), 2, 3) for a in (k, v)),
              _to_blocks(jnp.asarray(q_pos, jnp.int32), spec.q_block, -1),
              None if q_seg is None else _to_blocks(q_seg, spec.q_block),
              None if k_seg is None else _to_blocks(k_seg, spec.kv_block))
  out, lse = _flash(spec, x)
  out = out.reshape(nq, b, kh, g, spec.q_block, h).transpose(1, 0, 4, 2, 3, 5)
  lse = lse.reshape(nq, b, kh, g, spec.q_block).transpose(1, 0, 4, 2, 3)
  return out.reshape(b, -1, n, h)[:, :t], lse.reshape(b, -1, n)[:, :t]


def reference(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask,
              scale: float | None = None) -> jax.Array:
  """Full softmax attention, explicitly: the T x S logits at once (`attend_allowed`), O(T * S)
  memory; the twin the blocked path is tested against. Arguments and result as `attend`'s."""
  check_shapes(q, k, v, mask)
  t, s = q.shape[1], k.shape[1]
  scale = q.shape[3] ** -0.5 if scale is None else scale
  out, _ = attend_allowed(q, k, v, mask.materialize(t, s)[:, None], scale)
  return out.astype(q.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask,
           scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """Full softmax attention.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; K divides N (grouped-query attention when K < N).
    v: [B, S, K, H] values.
    mask: which keys each query sees.
    scale: logit scale; default H ** -0.5.
    impl: 'xla': the blocked path (`blocked`, blocks of BLOCK queries and keys, O(T + S) memory)
      when T or S exceeds BLOCK, else the explicit one (`reference`); 'pallas': the
      FlashAttention kernels over `blocksparse.dense_layout` (every key tile, or those up to the
      diagonal).
  Returns:
    [B, T, N, H]; a query that sees no key gets zeros.
  """
  check_shapes(q, k, v, mask)
  impl = kernels.resolve(impl)
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  scale = h ** -0.5 if scale is None else scale
  if impl == 'pallas':
    layout = blocksparse.dense_layout(t, s, causal=mask.causal)
    out, _ = blocksparse.attend_layout(q, k, v, mask=mask, layout=layout, scale=scale, impl=impl)
  elif max(t, s) > BLOCK:
    out, _ = blocked(q, k, v, q_pos=jnp.arange(t)[None] + (s - t), q_seg=mask.q_segment_ids,
                     k_seg=mask.kv_segment_ids, causal=mask.causal, scale=scale)
  else:
    return reference(q, k, v, mask=mask, scale=scale)
  return out.astype(q.dtype)


def init_cache(batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
               dtype) -> dict[str, jax.Array]:
  """An empty key/value cache: k, v [B, S_max, K, H] zeros in dtype, length [B] int32 zeros."""
  shape = (batch, max_len, num_kv_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'length': jnp.zeros((batch,), jnp.int32)}


def new_positions(cache: dict[str, jax.Array], mask: Mask,
                  t: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where the T new positions of a decoding call go.

  Args:
    cache: holds length [B] int32, the positions already cached per row.
    mask: q_segment_ids [B, T] is 1 on real new positions, 0 on right-padding (None: all real).
    t: T.
  Returns:
    positions [B, T] int32 (absolute: length + i), real [B, T] bool, new length [B] int32.
  """
  length = cache['length']
  positions = length[:, None] + jnp.arange(t, dtype=jnp.int32)
  if mask.q_segment_ids is None:
    real = jnp.ones(positions.shape, bool)
  else:
    real = mask.q_segment_ids != 0
  return positions, real, length + real.sum(1, dtype=jnp.int32)


def write(buffer: jax.Array, slots: jax.Array, real: jax.Array, x: jax.Array) -> jax.Array:
  """buffer [B, S, ...] with x [B, T, ...] written at slots [B, T] where real (scatter; a slot
  outside [0, S) is dropped, as is every padding position)."""
  slots = jnp.where(real, slots, buffer.shape[1])
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, slots].set(x.astype(buffer.dtype), mode='drop')


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal attention of T new positions to the cached ones and themselves.

  New position i of row b sits at absolute position cache['length'][b] + i and sees the cached
  and new keys at positions <= its own. Positions beyond the cache's S_max are not stored (the
  caller keeps lengths within it). As in `attend`, the blocked path runs when T or S_max exceeds
  BLOCK (key blocks after a row's last position are not visited), the explicit one otherwise.

  Args:
    q: [B, T, N, H] queries of the new positions.
    k, v: [B, T, K, H] their keys and values; K divides N.
    cache: from init_cache: k, v [B, S_max, K, H], length [B].
    mask: causal; q_segment_ids [B, T] marks real new positions (1) and right-padding (0).
    scale: logit scale; default H ** -0.5.
  Returns:
    out [B, T, N, H] (finite, arbitrary at padding) and the cache with the real positions added.
  """
  check_shapes(q, k, v, mask)
  positions, real, length = new_positions(cache, mask, q.shape[1])
  ck, cv = write(cache['k'], positions, real, k), write(cache['v'], positions, real, v)
  scale = q.shape[3] ** -0.5 if scale is None else scale
  if max(q.shape[1], ck.shape[1]) > BLOCK:  # As attend; a real position's slots are written.
    out, _ = blocked(q, ck, cv, q_pos=positions, causal=True, scale=scale)
  else:
    slots = jnp.arange(ck.shape[1])
    allowed = (slots <= positions[:, :, None]) & (slots < length[:, None, None])  # [B, T, S_max]
    out, _ = attend_allowed(q, ck, cv, allowed[:, None], scale)
  return out.astype(q.dtype), {'k': ck, 'v': cv, 'length': length}
