"""Ring attention: softmax attention with the length axis split over devices (Liu et al. 2023).

The context twins (`Family.context`) of dense, strided and fixed, and the all-gather twin of
bigbird. Each runs inside jax.shard_map over the mesh axis `axis_name` (R devices): device r holds
the contiguous block r of the queries, keys and values ([B, T_local, ...], T = R * T_local).

Ring (dense, strided, fixed): each device keeps its queries and passes its key/value block (and the
keys' segment ids) to the next device with `jax.lax.ppermute`, R - 1 times; the partial softmaxes
over the blocks it sees are merged by their log-sum-exp (`blocksparse.merge`, Milakov & Gimelshein
2018). A block's mask is `Mask.allowed` on global positions, and for strided / fixed also the
family's elementwise pattern (Child et al. 2019, Sec. 4.2): exact, with memory O(T_local^2) per
step, but every block is computed densely (the sparsity saves nothing across devices).

Causal, the work is balanced by a zig-zag order when T_local is even: the length is cut into 2R
chunks and device r holds chunks r and 2R-1-r (Brandon et al. 2023, "striped" / zig-zag), put
there by two ppermutes of half blocks on the way in and undone on the way out (a global
permutation of the length axis, applied by the twin itself). Then at every step s > 0 a device
computes exactly half a block: all its queries against the key block's first chunk (the key block
comes from an earlier device) or its second query chunk against the whole key block (a later
device); the diagonal step is one masked block. The choice is a `lax.switch` on the device's index,
so the skipped half is not computed. With T_local odd the blocks stay contiguous and a key block
wholly in the future is skipped by the same switch (the last device then does R blocks, the first
one: unbalanced).

Backward (a custom_vjp, as the ring attention paper does): the forward saves only this device's
q, k, v, the output and the log-sum-exp; the backward passes the key/value block around the ring
again, now with its gradient accumulators dk, dv, which arrive home after R hops. Memory per device
is O(T_local) saved plus one block's O(T_local^2) logits; autodiff through the loop would save
every step's key/value block (O(T) per device, the all-gather's cost) and its probabilities.

BigBird's random blocks and global tokens are not elementwise in positions; its twin all-gathers
q, k, v and the mask over the ring and runs bigbird.attend on the whole length, keeping this
device's block of the output: O(T) memory and the whole attention's compute on every device
(correct, no saving; `gathered`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from efflong import errors
from efflong.attention import bigbird, blocksparse, dense, local
from efflong.mask import NEG_INF, Mask, Pattern

AxisName = Any  # a mesh axis name (or a tuple of them)


@dataclasses.dataclass(frozen=True)
class _Ring:
  """The static description of one ring attention call."""

  axis_name: AxisName
  causal: bool
  zigzag: bool
  scale: float
  pattern: Pattern | None  # elementwise (query position, key position, query head) -> bool


def _check_impl(impl: str) -> None:
  if impl == 'pallas':
    raise errors.Error("attention_impl='pallas' has no context-parallel path: ring attention's "
                       "blocks run in XLA; use 'xla' or 'auto' with mesh.context > 1.")


# Zig-zag order: of the 2R chunks of length c = T_local / 2, device d holds chunks 2d and 2d+1 in
# the contiguous order and chunks d and 2R-1-d in the zig-zag one.


def _zigzag_home(chunk: int, r: int) -> int:
  """The device that holds `chunk` (of 2r) in the zig-zag order."""
  return chunk if chunk < r else 2 * r - 1 - chunk


def _halves_perms(r: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
  """ppermute pairs moving each device's first (even chunk) and second (odd chunk) half from the
  contiguous order to the device that holds it in the zig-zag order."""
  return ([(d, _zigzag_home(2 * d, r)) for d in range(r)],
          [(d, _zigzag_home(2 * d + 1, r)) for d in range(r)])


def _to_zigzag(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """[B, T_local, ...] from the contiguous order to the zig-zag order (a global permutation).

  Device e receives one even and one odd chunk; its chunk e comes first, so an odd e swaps them.
  """
  r, e = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  c = x.shape[1] // 2
  even_perm, odd_perm = _halves_perms(r)
  even = jax.lax.ppermute(x[:, :c], axis_name, even_perm)
  odd = jax.lax.ppermute(x[:, c:], axis_name, odd_perm)
  first_even = e % 2 == 0
  return jnp.concatenate([jnp.where(first_even, even, odd), jnp.where(first_even, odd, even)], 1)


def _from_zigzag(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """The inverse of _to_zigzag."""
  r, e = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  c = x.shape[1] // 2
  first_even = e % 2 == 0
  even = jnp.where(first_even, x[:, :c], x[:, c:])
  odd = jnp.where(first_even, x[:, c:], x[:, :c])
  even_perm, odd_perm = _halves_perms(r)
  back = lambda perm: [(dst, src) for src, dst in perm]
  return jnp.concatenate([jax.lax.ppermute(even, axis_name, back(even_perm)),
                          jax.lax.ppermute(odd, axis_name, back(odd_perm))], axis=1)


def _positions(spec: _Ring, block: jax.Array, t: int) -> jax.Array:
  """[1, T_local] global positions of the block held (at the start) by device `block`."""
  if not spec.zigzag:
    return (block * t + jnp.arange(t, dtype=jnp.int32))[None]
  c, r = t // 2, jax.lax.axis_size(spec.axis_name)
  chunk = jnp.arange(c, dtype=jnp.int32)
  return jnp.concatenate([block * c + chunk, (2 * r - 1 - block) * c + chunk])[None]


def _allowed(spec: _Ring, q_pos: jax.Array, q_seg: jax.Array | None, k_pos: jax.Array,
             k_seg: jax.Array | None, heads: int) -> jax.Array:
  """[B|1, N|1, Tq, Sk] visibility of a key block to a query block (global positions [1, .])."""
  seg = lambda ids, axis: None if ids is None else jnp.expand_dims(ids, axis)
  # Global positions of one sequence (T == S): no causal offset, hence equal lengths.
  ok = Mask(causal=spec.causal).allowed(q_pos[:, :, None], k_pos[:, None, :], seg(q_seg, 2),
                                        seg(k_seg, 1), 0, 0)[:, None]
  if spec.pattern is not None:
    ok = ok & spec.pattern(q_pos[:, None, :, None], k_pos[:, None, None, :],
                           jnp.arange(heads)[None, :, None, None])
  return ok


def _block_forward(spec: _Ring, rows: tuple, cols: tuple) -> tuple[tuple, tuple]:
  """One query block against one key block: ((out, lse), ()) as dense.attend_allowed gives."""
  q, q_pos, q_seg = rows
  k, v, k_seg, k_pos = cols
  allowed = _allowed(spec, q_pos, q_seg, k_pos, k_seg, q.shape[2])
  return dense.attend_allowed(q, k, v, allowed, spec.scale), ()


def _block_backward(spec: _Ring, rows: tuple, cols: tuple) -> tuple[tuple, tuple]:
  """The gradients of one block pair: ((dq,), (dk, dv)), from the global log-sum-exp.

  With p = exp(s - lse) the softmax probabilities and delta = rowsum(dout * out):
  dv = p^T dout, ds = p * (dout v^T - delta), dq = ds k * scale, dk = ds^T q * scale
  (FlashAttention-2, Dao 2023, Alg. 2).
  """
  q, q_pos, q_seg, dout, lse, delta = rows
  k, v, k_seg, k_pos = cols
  b, t, n, h = q.shape
  kh = k.shape[2]
  allowed = _allowed(spec, q_pos, q_seg, k_pos, k_seg, n)
  allowed = allowed.reshape(allowed.shape[0], *((kh, n // kh) if allowed.shape[1] == n
                                                else (1, 1)), *allowed.shape[2:])
  group = lambda x: x.reshape(b, t, kh, n // kh, h)                                 # [B,T,K,G,H]
  rowwise = lambda x: jnp.moveaxis(x.reshape(b, t, kh, n // kh), 1, 3)[..., None]   # [B,K,G,T,1]
  qg, dog = group(q), group(dout.astype(jnp.float32))
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k, preferred_element_type=jnp.float32) * spec.scale
  p = jnp.exp(jnp.where(allowed, logits - rowwise(lse), -jnp.inf))
  dv = jnp.einsum('BKGTS,BTKGH->BSKH', p, dog)
  ds = p * (jnp.einsum('BTKGH,BSKH->BKGTS', dog, v, preferred_element_type=jnp.float32)
            - rowwise(delta))
  dq = jnp.einsum('BKGTS,BSKH->BTKGH', ds, k, preferred_element_type=jnp.float32) * spec.scale
  dk = jnp.einsum('BKGTS,BTKGH->BSKH', ds, qg, preferred_element_type=jnp.float32) * spec.scale
  return (dq.reshape(b, t, n, h),), (dk, dv)


def _cases(spec: _Ring, t: int) -> list[tuple[slice, slice]]:
  """The (query rows, key columns) of a block pair each case computes; see _case."""
  every = slice(0, t)
  if not spec.causal:
    return [(every, every)]
  if not spec.zigzag:
    return [(every, every), (slice(0, 0), every)]   # the diagonal or earlier; a future block
  c = t // 2
  return [(every, every), (every, slice(0, c)), (slice(c, t), every)]


def _case(spec: _Ring, me: jax.Array, block: jax.Array) -> jax.Array:
  """Which of _cases a device's queries and the key block of device `block` need.

  Causal, contiguous: the diagonal or an earlier block (all, masked), or a later one (nothing).
  Causal, zig-zag: the diagonal (all, masked); an earlier device's block: all queries against
  its first chunk (its second is after both of ours); a later device's block: our second query
  chunk against all of it (both its chunks are before our second and after our first).
  """
  if not spec.causal:
    return jnp.int32(0)
  if not spec.zigzag:
    return (block > me).astype(jnp.int32)
  return jnp.where(block == me, 0, jnp.where(block < me, 1, 2))


def _visit(fn: Callable[..., tuple[tuple, tuple]], spec: _Ring, case: jax.Array, rows: tuple,
           cols: tuple, row_fills: tuple[float, ...]) -> tuple[tuple, tuple]:
  """fn on the (rows, columns) part `case` selects, its results padded back to the whole block:
  the row results (along the queries) with row_fills, the column ones (along the keys) with 0."""
  t = rows[0].shape[1]

  def part(rs: slice, cs: slice) -> Callable[[tuple, tuple], tuple[tuple, tuple]]:
    def run(rows, cols):
      cut = lambda tree, sl: jax.tree.map(lambda x: x[:, sl], tree)
      row_out, col_out = fn(spec, cut(rows, rs), cut(cols, cs))
      pad = lambda x, sl, fill: jnp.pad(x, [(0, 0), (sl.start, t - sl.stop)] + [(0, 0)] *
                                        (x.ndim - 2), constant_values=fill)
      return (tuple(pad(x, rs, f) for x, f in zip(row_out, row_fills)),
              tuple(pad(x, cs, 0) for x in col_out))
    return run

  branches = [part(*c) for c in _cases(spec, t)]
  if len(branches) == 1:
    return branches[0](rows, cols)
  return jax.lax.switch(case, branches, rows, cols)


def _shift(tree: Any, axis_name: AxisName) -> Any:
  """Every array of tree to the next device of the ring (d -> d + 1 mod R)."""
  r = jax.lax.axis_size(axis_name)
  return jax.lax.ppermute(tree, axis_name, [(d, (d + 1) % r) for d in range(r)])


def _ring_forward(spec: _Ring, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
                  kv_seg: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(out [B, T_local, N, H] float32, lse [B, T_local, N]) over the whole ring of key blocks."""
  r, me = jax.lax.axis_size(spec.axis_name), jax.lax.axis_index(spec.axis_name)
  t = q.shape[1]
  rows = (q, _positions(spec, me, t), q_seg)

  def visit(block, kv):
    return _visit(_block_forward, spec, _case(spec, me, block), rows,
                  (*kv, _positions(spec, block, t)), (0.0, NEG_INF))[0]

  def step(s, carry):
    acc, kv = carry
    kv = _shift(kv, spec.axis_name)  # now the block of device me - s
    return blocksparse.merge([acc, visit((me - s) % r, kv)]), kv

  kv = (k, v, kv_seg)
  acc, _ = jax.lax.fori_loop(1, r, step, (visit(me, kv), kv))
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec: _Ring, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
          kv_seg: jax.Array | None) -> jax.Array:
  """Ring attention of this device's queries over every device's keys: [B, T_local, N, H]."""
  return _ring_forward(spec, q, k, v, q_seg, kv_seg)[0].astype(q.dtype)


def _ring_fwd(spec, q, k, v, q_seg, kv_seg):
  out, lse = _ring_forward(spec, q, k, v, q_seg, kv_seg)
  out = out.astype(q.dtype)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(spec, residuals, dout):
  """The ring again: each key block travels with its gradients dk, dv, which come home after R
  hops (the last hop carries them alone)."""
  q, k, v, q_seg, kv_seg, out, lse = residuals
  r, me = jax.lax.axis_size(spec.axis_name), jax.lax.axis_index(spec.axis_name)
  t = q.shape[1]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, N]
  rows = (q, _positions(spec, me, t), q_seg, dout, lse, delta)

  def visit(block, kv):
    (dq,), dkv = _visit(_block_backward, spec, _case(spec, me, block), rows,
                        (*kv, _positions(spec, block, t)), (0.0,))
    return dq, dkv

  def step(s, carry):
    dq, kv, dkv = carry
    kv, dkv = _shift((kv, dkv), spec.axis_name)
    dq_s, dkv_s = visit((me - s) % r, kv)
    return dq + dq_s, kv, jax.tree.map(jnp.add, dkv, dkv_s)

  kv = (k, v, kv_seg)
  dq, dkv = visit(me, kv)
  dq, _, dkv = jax.lax.fori_loop(1, r, step, (dq, kv, dkv))
  dk, dv = _shift(dkv, spec.axis_name)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: AxisName,
                scale: float | None = None, pattern: Pattern | None = None) -> jax.Array:
  """Ring attention of this device's block (see the module docstring).

  Args:
    q: [B, T_local, N, H], the queries of global positions axis_index * T_local + i.
    k, v: [B, T_local, K, H], the keys and values of the same positions; K divides N.
    mask: causal flag and this block's segment ids (global tokens are not read).
    axis_name: the mesh axis the length is split over (inside shard_map).
    scale: logit scale; default H ** -0.5.
    pattern: None, or an elementwise restriction on (global query position, global key position,
      query head).
  Returns:
    [B, T_local, N, H]: this block of the attention over the whole length.
  """
  dense.check_shapes(q, k, v, mask)
  if q.shape[1] != k.shape[1]:
    raise errors.Error(f'ring attention is self-attention split over devices: T_local={q.shape[1]} '
                       f'must equal S_local={k.shape[1]}.')
  r = jax.lax.axis_size(axis_name)
  zigzag = mask.causal and r > 1 and q.shape[1] % 2 == 0
  spec = _Ring(axis_name=axis_name, causal=mask.causal, zigzag=zigzag,
               scale=q.shape[3] ** -0.5 if scale is None else scale, pattern=pattern)
  arrays = (q, k, v, mask.q_segment_ids, mask.kv_segment_ids)
  if not zigzag:
    return _ring(spec, *arrays)
  arrays = jax.tree.map(lambda x: _to_zigzag(x, axis_name), arrays)
  return _from_zigzag(_ring(spec, *arrays), axis_name)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: AxisName,
           scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """dense.attend's context twin: ring attention (see ring_attend; impl 'pallas' is refused)."""
  _check_impl(impl)
  return ring_attend(q, k, v, mask=mask, axis_name=axis_name, scale=scale)


def _halves(n: int, first: jax.Array, second: jax.Array,
            factorized: bool) -> Callable[..., jax.Array]:
  """Pattern from two parts: their union, or (factorized) the first for query heads [0, N/2) and
  the second for [N/2, N), as sparse.attend_parts splits them."""
  if factorized and n % 2:
    raise errors.Error(f'factorized=True splits the heads in two; N={n} is odd.')
  def pattern(i, j, head):
    if factorized:
      return jnp.where(head < n // 2, first(i, j), second(i, j))
    return first(i, j) | second(i, j)
  return pattern


def strided(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: AxisName,
            stride: int, factorized: bool = False, block: int | None = None,
            scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """sparse.strided's context twin: ring attention restricted to the strided pattern (band
  |i - j| < l, column (i - j) mod l == 0). block (the layouts' tile) has no use here."""
  local.check_positive(stride=stride, **({} if block is None else dict(block=block)))
  local.check_self(q, k, v, mask, 'strided')
  _check_impl(impl)
  pattern = _halves(q.shape[2], lambda i, j: jnp.abs(i - j) < stride,
                    lambda i, j: (i - j) % stride == 0, factorized)
  return ring_attend(q, k, v, mask=mask, axis_name=axis_name, scale=scale, pattern=pattern)


def fixed(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: AxisName,
          block: int, summary: int = 1, factorized: bool = False, scale: float | None = None,
          impl: str = 'xla') -> jax.Array:
  """sparse.fixed's context twin: ring attention restricted to the fixed pattern (own block
  i // l == j // l, summary columns j mod l >= l - c)."""
  local.check_positive(block=block, summary=summary)
  if summary > block:
    raise errors.Error(f'summary={summary} must be <= block={block}.')
  local.check_self(q, k, v, mask, 'fixed')
  _check_impl(impl)
  pattern = _halves(q.shape[2], lambda i, j: i // block == j // block,
                    lambda i, j: j % block >= block - summary, factorized)
  return ring_attend(q, k, v, mask=mask, axis_name=axis_name, scale=scale, pattern=pattern)


def gathered(attend_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """A family's context twin by all-gather: q, k, v, the mask's arrays and the [B, T_local, ...]
  inputs are gathered over axis_name, attend_fn runs on the whole length, and this device's block
  of its output is kept. O(T) memory and the whole compute per device. The twin's signature is
  attend_fn's plus axis_name (the registry checks it; impl reaches attend_fn)."""

  @functools.wraps(attend_fn)
  def twin(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: AxisName,
           **hyper: Any) -> jax.Array:
    t = q.shape[1]
    whole = lambda x: (jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
                       if isinstance(x, jax.Array) and x.shape[:2] == q.shape[:2] else x)
    out = attend_fn(whole(q), whole(k), whole(v), mask=jax.tree.map(whole, mask),
                    **jax.tree.map(whole, hyper))
    return jax.lax.dynamic_slice_in_dim(out, jax.lax.axis_index(axis_name) * t, t, axis=1)

  signature = inspect.signature(attend_fn)
  twin.__signature__ = signature.replace(parameters=[
      *signature.parameters.values(), inspect.Parameter('axis_name', inspect.Parameter.KEYWORD_ONLY)])
  return twin


bigbird_gathered = gathered(bigbird.attend)
