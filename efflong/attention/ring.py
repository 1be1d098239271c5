"""Ring attention: softmax attention with the length axis split over devices (Liu et al. 2023).

The context twins (`Family.context`) of dense, strided and fixed, and the all-gather twin of
bigbird. Each runs inside jax.shard_map over the mesh axis `axis_name` (R devices): device r holds
the contiguous block r of the queries, keys and values ([B, T_local, ...], T = R * T_local).

Ring (dense, strided, fixed): each device keeps its queries and passes its key/value block (and the
keys' segment ids) to the next device with `jax.lax.ppermute`, R - 1 times; the partial softmaxes
over the blocks it sees are merged by their log-sum-exp (`blocksparse.merge`, Milakov & Gimelshein
2018). A block's mask is `Mask.allowed` on global positions, and for strided / fixed also the
family's elementwise pattern (Child et al. 2019, Sec. 4.2): exact, but every block is computed
densely (the sparsity saves nothing across devices). Within a block pair the queries go in chunks
whose logits stay under CHUNK_LOGITS per head, each rematerialized (`_block`).

Causal, the work is balanced by a zig-zag order when T_local is even: the length is cut into 2R
chunks and device r holds chunks r and 2R-1-r (the zig-zag of Megatron-LM's context parallelism;
Brandon et al. 2023 balance by striping tokens instead), put there by two ppermutes of half
blocks on the way in and undone on the way out (a global permutation of the length axis, applied
by the twin itself). Then at every step s > 0 a device computes exactly half a block: all its
queries against the key block's first chunk (the key block comes from an earlier device) or its
second query chunk against the whole key block (a later device); the diagonal step is one masked
block. The choice is a `lax.switch` on the device's index, so the skipped half is not computed.
With T_local odd the blocks stay contiguous and a key block wholly in the future is skipped by the
same switch (the last device then does R blocks, the first one: unbalanced).

Backward (a custom_vjp, as the ring attention paper does): the forward saves only this device's
q, k, v, the output and the log-sum-exp; the backward passes the key/value block around the ring
again, now with its gradient accumulators dk, dv, which arrive home after R hops, and recomputes
each block pair's part through its own VJP. Memory per device is O(T_local) plus one chunk's
logits; autodiff through the loop would instead save every step's key/value block (O(T) per
device, the all-gather's cost).

Bytes one device sends per layer and call (n = T_local, e = bytes per key/value element, 4 for a
segment id, only when the mask has them): forward (R - 1) B n (2 K H e + 4); backward the same
again plus R B n 2 K H 4 (dk, dv accumulate in float32); zig-zag adds the two half-block ppermutes
of q, k, v (and segment ids) in and of the output out, and their transposes in the backward.

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
  """Refuses impl='pallas' in one line ('auto' runs the XLA blocks)."""
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


def _allowed(spec: _Ring, causal: bool, q_pos: jax.Array, q_seg: jax.Array | None,
             k_pos: jax.Array, k_seg: jax.Array | None, heads: int) -> jax.Array:
  """[B|1, N|1, Tq, Sk] visibility of a key block to a query block (global positions [1, .])."""
  seg = lambda ids, axis: None if ids is None else jnp.expand_dims(ids, axis)
  # Global positions of one sequence (T == S): no causal offset, hence equal lengths.
  ok = Mask(causal=causal).allowed(q_pos[:, :, None], k_pos[:, None, :], seg(q_seg, 2),
                                   seg(k_seg, 1), 0, 0)[:, None]
  if spec.pattern is not None:
    ok = ok & spec.pattern(q_pos[:, None, :, None], k_pos[:, None, None, :],
                           jnp.arange(heads)[None, :, None, None])
  return ok


# A chunk of queries holds at most this many logits per head (C x S_k, C a divisor of T_q): the
# ring's largest temporaries, whatever T_local (a bound, not a tile size: C is 8 at T_local = 32K).
CHUNK_LOGITS = 2**18


def _explicit(spec: _Ring, causal: bool, rows: tuple, cols: tuple) -> tuple[jax.Array, jax.Array]:
  """Queries against a key block with the explicit logits (dense.attend_allowed)."""
  q, q_pos, q_seg = rows
  k, v, k_seg, k_pos = cols
  allowed = _allowed(spec, causal, q_pos, q_seg, k_pos, k_seg, q.shape[2])
  return dense.attend_allowed(q, k, v, allowed, spec.scale)


def _block(spec: _Ring, causal: bool, rows: tuple, cols: tuple) -> tuple[jax.Array, jax.Array]:
  """One query block against one key block, differentiable: (out [B, Tq, N, H] float32, lse
  [B, Tq, N]); causal: apply the causal mask.

  The queries go in chunks of C, the largest divisor of Tq with C x S_k <= CHUNK_LOGITS (or 1),
  each under jax.checkpoint: a chunk's logits are the only large temporaries, and its VJP
  recomputes them (memory O(T_local) per device besides).
  """
  tq, sk = rows[0].shape[1], cols[0].shape[1]
  c = max(d for d in range(1, tq + 1) if tq % d == 0 and d * sk <= max(CHUNK_LOGITS, sk))
  if c == tq:
    return _explicit(spec, causal, rows, cols)
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], tq // c, c, *x.shape[2:]), 1, 0)
  chunk = jax.checkpoint(lambda rows: _explicit(spec, causal, rows, cols))
  out, lse = jax.lax.map(chunk, jax.tree.map(split, rows))     # [Tq / C, B, C, N, ...]
  join = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], tq, *x.shape[3:])
  return join(out), join(lse)


def _cases(spec: _Ring, t: int) -> list[tuple[slice, slice, bool]]:
  """(query rows, key columns, causal mask) of a block pair in each case; see _case."""
  every = slice(0, t)
  if not spec.causal:
    return [(every, every, False)]
  if not spec.zigzag:
    return [(every, every, True), (every, every, False), (slice(0, 0), every, False)]
  c = t // 2
  return [(every, every, True), (every, slice(0, c), False), (slice(c, t), every, False)]


def _case(spec: _Ring, me: jax.Array, block: jax.Array) -> jax.Array:
  """Which of _cases a device's queries and the key block of device `block` need.

  Bidirectional: every pair. Causal: the diagonal, masked (case 0); an earlier device's block
  (case 1): contiguous, all of it, unmasked; zig-zag, all our queries against its first chunk
  (its second chunk is after both of ours); a later device's block (case 2): contiguous, nothing;
  zig-zag, our second query chunk against all of it (both its chunks are before our second and
  after our first).
  """
  if not spec.causal:
    return jnp.int32(0)
  return jnp.where(block == me, 0, jnp.where(block < me, 1, 2))


def _visit(spec: _Ring, me: jax.Array, block: jax.Array, rows: tuple,
           cols: tuple) -> tuple[jax.Array, jax.Array]:
  """(out, lse) of this device's queries over the key block of device `block`: _block on the part
  _case selects (a lax.switch: the rest is not computed), padded back to every query row (out 0,
  lse NEG_INF where a row was not computed)."""
  t = rows[0].shape[1]

  def part(rs: slice, cs: slice, causal: bool) -> Callable[[tuple, tuple], tuple]:
    def run(rows, cols):
      if rs.start == rs.stop:  # nothing to compute
        return jnp.zeros_like(rows[0], jnp.float32), jnp.full_like(rows[0][..., 0], NEG_INF,
                                                                   jnp.float32)
      cut = lambda tree, sl: jax.tree.map(lambda x: x[:, sl], tree)
      out, lse = _block(spec, causal, cut(rows, rs), cut(cols, cs))
      pad = lambda x, fill: jnp.pad(x, [(0, 0), (rs.start, t - rs.stop)] + [(0, 0)] *
                                    (x.ndim - 2), constant_values=fill)
      return pad(out, 0.0), pad(lse, NEG_INF)
    return run

  branches = [part(*c) for c in _cases(spec, t)]
  if len(branches) == 1:
    return branches[0](rows, cols)
  return jax.lax.switch(_case(spec, me, block), branches, rows, cols)


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
  visit = lambda block, kv: _visit(spec, me, block, rows, (*kv, _positions(spec, block, t)))

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
  return out.astype(q.dtype), (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(spec, residuals, dout):
  """The ring again: each key block travels with its gradients dk, dv, which come home after R
  hops (the last hop carries them alone).

  A block's part (out_b, lse_b) enters the output as out = sum_b w_b out_b with w_b =
  exp(lse_b - lse) (blocksparse.merge), so its cotangents are w_b dout for out_b and
  w_b dout . (out_b - out) for lse_b; the block's own VJP (recomputed, one block at a time) turns
  them into dq, dk, dv.
  """
  q, k, v, q_seg, kv_seg, out, lse = residuals
  r, me = jax.lax.axis_size(spec.axis_name), jax.lax.axis_index(spec.axis_name)
  t = q.shape[1]
  q_pos, dout = _positions(spec, me, t), dout.astype(jnp.float32)

  def grads(block, k, v, kv_seg):
    part = lambda q, k, v: _visit(spec, me, block, (q, q_pos, q_seg),
                                  (k, v, kv_seg, _positions(spec, block, t)))
    (out_b, lse_b), pullback = jax.vjp(part, q, k, v)
    w = jnp.exp(lse_b - lse)
    return pullback((w[..., None] * dout, w * jnp.sum(dout * (out_b - out), axis=-1)))

  def step(s, carry):
    dq, kv, dkv = carry
    kv, dkv = _shift((kv, dkv), spec.axis_name)  # the block of device me - s, and its gradients
    dq_s, *dkv_s = grads((me - s) % r, *kv)
    return dq + dq_s, kv, jax.tree.map(jnp.add, dkv, tuple(dkv_s))

  f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
  dq, dk, dv = f32(*grads(me, k, v, kv_seg))
  dq, _, (dk, dv) = jax.lax.fori_loop(1, r, step, (dq, (k, v, kv_seg), (dk, dv)))
  dk, dv = _shift((dk, dv), spec.axis_name)
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
  axis_name = inspect.Parameter('axis_name', inspect.Parameter.KEYWORD_ONLY)
  twin.__signature__ = signature.replace(parameters=[*signature.parameters.values(), axis_name])
  return twin


bigbird_gathered = gathered(bigbird.attend)
