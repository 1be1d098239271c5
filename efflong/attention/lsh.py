"""Reformer LSH attention (Kitaev, Kaiser, Levskaya 2020, section 2 and appendix).

Per hash round r and head n: the keys (shared QK: the unit-normalised queries) are hashed by a random
rotation, h(x) = argmax([x R; -x R]) with R [H, n_buckets / 2] (section 2, "Locality sensitive
hashing", after Andoni et al. 2015), and positions are sorted by (bucket, position). Each round is
sorted on its own (the paper concatenates the rounds' sorts into one sequence; apart from where a
chunk boundary falls, which only the chunked form sees, the two agree: a query attends only within
its own round).

Which keys a query sees in a round (its window), with the paper's defaults:
- `attend_across_buckets=False` (Eq. 3, P_i = {j : h(q_i) = h(k_j)}): only keys of its own bucket.
- The bidirectional, chunked form: the sorted sequence is cut into chunks of C = `bucket_size`;
  a chunk's queries see the keys of their chunk and of the previous one (cyclically), less the keys
  of other buckets. `attend_across_buckets=True` keeps those too (efflong before 2026-12).
- The causal, band form (`causal_band=True`, the default under a causal mask): a query sees the
  keys of its own bucket among the C sorted positions before it. Within a bucket the sort keeps
  the original order, so these are its C most recent same-bucket keys, which no future token can
  change: the output at t depends on tokens <= t only. The chunked form is not causal in that
  sense: a future token's bucket moves the chunk boundaries and so which past keys share a query's
  chunk. Measured by `./launch.sh bench lsh_causality` (experiments/results/lsh_causality_cpu.md;
  attention alone at T = 512, bucket_size 32, 2 rounds, and the duplication LM at T = 64): with
  every bucket visible (attend_across_buckets=True, efflong's form before 2026-12) replacing the
  tokens after t moves the outputs at 98% of the positions <= t, by up to 1.3x the largest output
  (the model's logits: 96%, up to 0.49x); with the paper's same-bucket mask it moves none at
  T = 512 (buckets there hold fewer keys than a chunk, so all of a query's past same-bucket keys
  stay within reach) but still 24% of the model's positions, by up to 0.06x; the band moves
  nothing (float rounding, below 1e-6). Both forms cost O(T * C * R): the band is a chunk and its
  predecessor, band-masked.

Across rounds (appendix, "multi-round LSH attention"): each round's attention gives out_r and its
log-sum-exp lse_r; out = sum_r exp(lse_r - lse) out_r with lse = logsumexp_r lse_r. With
`allow_duplicates=False` (the paper's) a key that falls in a query's window in N_ij of the rounds
gets -log N_ij added to its logit in each, so the combination is the softmax over the union of the
windows, every key counted once; True counts it once per round.

Masks, as values carried along the sort: causal through the original positions, segment ids for
padding and packing, and a token never attends to itself unless nothing else is available (its logit
is SELF, a large negative, section 2 "Causal masking for shared-QK attention"). T is padded inside to
a multiple of bucket_size. Memory is O(n_hashes * T * bucket_size) (times n_hashes more for the
duplicate count, which compares every round's bucket and sorted index of both tokens).

Implementation (the XLA path; `./launch.sh bench lsh_rounds` measures it against an older
revision): the rounds are one batch axis throughout. Each row and round is sorted once, by the
packed int32 keys bucket * Tp + position (`sort_buckets`); q, k and v are read once into every
round's sorted order (`sort_rounds`); the chunks of all rounds and heads attend as one batch, and
each round's output is read back into position order and the rounds combined (`attend_rounds`).
Backwards are written out: a permutation's gradient is the read at its inverse (not autodiff's
scatter-add), and attention's is FlashAttention's from the saved probabilities, with one read of
the cotangent per round; sums over the rounds are written out term by term (XLA's CPU reductions
over an outer axis are slow).

Decoding (`init_cache`, `attend_step`; the band form only): per row, head, round and bucket, a ring of
the positions of the bucket's C most recent keys. A new query's window in a round is its bucket's
ring plus itself, read by index (O(R C) keys per token and head, never the whole cache), and N_ij
counts the rounds whose ring holds key j: this is the band exactly. The bucket count must not follow
the sequence: n_buckets=None takes `default_buckets(max_len)`, what `attend` takes over max_len
positions (the twin of a shorter sequence is `attend` with that n_buckets given). In the parallel
form the band's C slots are shared by all the segments of a packed row (another sequence's
same-bucket keys take slots, then are masked); a decoded row holds one sequence, so the two agree.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from efflong import errors, kernels
from efflong.kernels import flash_attention
from efflong.mask import Mask, softmax

SELF = -1e5  # A token's logit for itself: below any real logit, above a masked one.
PACKED_KEYS = 2**31 - 1  # `sort_buckets` packs bucket * Tp + position up to this.
FLAGS = ('attend_across_buckets', 'allow_duplicates', 'causal_band')


def factors(n_buckets: int, head_dim: int) -> tuple[int, ...]:
  """Bucket factors (even): (n_buckets,), or (b1, b2) with b1 * b2 = n_buckets when n_buckets >
  2 * head_dim, so hashing costs T (b1 + b2) / 2 rather than T n_buckets (paper, section 2: "for
  a large number of buckets, we factorise the rotations")."""
  if n_buckets <= 2 * head_dim:
    return (n_buckets,)
  pairs = [(d, n_buckets // d) for d in range(2, n_buckets, 2)
           if n_buckets % d == 0 and (n_buckets // d) % 2 == 0]
  if not pairs:
    return (n_buckets,)
  return min(pairs, key=lambda p: abs(p[0] - p[1]))


def rotations(key: jax.Array, *, num_heads: int, n_hashes: int, head_dim: int,
              n_buckets: int) -> jax.Array:
  """Random rotations R [N, R, H, sum(f / 2 for f in factors)], one per head and hash round."""
  width = sum(f // 2 for f in factors(n_buckets, head_dim))
  return jax.random.normal(key, (num_heads, n_hashes, head_dim, width), jnp.float32)


def buckets(x: jax.Array, rot: jax.Array, n_buckets: int) -> jax.Array:
  """Angular LSH: x [B, T, N, H], rot from `rotations` -> bucket ids [B, N, R, T] int32.

  Per factor f: argmax([x R_f; -x R_f]) in [0, f); the ids combine as digits (mixed radix).
  """
  xr = jnp.einsum('BTNH,NRHU->BNRTU', x.astype(jnp.float32), rot)
  bucket, start, radix = 0, 0, 1
  for f in factors(n_buckets, x.shape[-1]):
    part = xr[..., start:start + f // 2]
    bucket = bucket + radix * jnp.argmax(jnp.concatenate([part, -part], axis=-1), axis=-1)
    start, radix = start + f // 2, radix * f
  return bucket.astype(jnp.int32)


def sort_buckets(bucket: jax.Array, n_buckets: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each round's order by (bucket, position).

  One sort per row of the int32 keys bucket * Tp + position, unique, so the sort needs no
  stability and carries no second operand (on the CPU a third of the time of a stable argsort);
  where n_buckets * Tp does not fit in int32, a sort of the pairs (bucket, position). The inverse
  permutation is a scatter, not a second sort.

  Args:
    bucket: [B, N, R, Tp] int32 in [0, n_buckets).
    n_buckets: the bucket count.
  Returns:
    (the buckets in sorted order, perm, inverse), each [B, N, R, Tp] int32: perm[..., i] is the
    position at sorted index i, inverse[..., t] the sorted index of position t.
  """
  padded = bucket.shape[-1]
  iota = jax.lax.broadcasted_iota(jnp.int32, bucket.shape, 3)
  if n_buckets * padded <= PACKED_KEYS:
    key = jax.lax.sort(bucket * padded + iota, dimension=3)
    ordered, perm = key // padded, key % padded
  else:
    ordered, perm = jax.lax.sort((bucket, iota), dimension=3, num_keys=2)
  inverse = jnp.put_along_axis(jnp.zeros_like(perm), perm, iota, axis=3, inplace=False)
  return ordered, perm, inverse


def _slots(perm: jax.Array) -> tuple[jax.Array, ...]:
  """Indices reading a [B, Tp, N, ...] array at every round's sorted order: [B, N, R, Tp, ...]."""
  b, n = perm.shape[:2]
  return (jnp.arange(b).reshape(b, 1, 1, 1), perm, jnp.arange(n).reshape(1, n, 1, 1))


def _positions(inverse: jax.Array) -> tuple[jax.Array, ...]:
  """Indices reading a [B, N, R, Tp, ...] sorted array at each position: [R, B, Tp, N, ...]
  (round-major: each round's slab is contiguous for the sum over rounds)."""
  b, n, r, _ = inverse.shape
  return (jnp.arange(b).reshape(1, b, 1, 1), jnp.arange(n).reshape(1, 1, 1, n),
          jnp.arange(r).reshape(r, 1, 1, 1), jnp.transpose(inverse, (2, 0, 3, 1)))


def _round_slots(perm: jax.Array) -> tuple[jax.Array, ...]:
  """Indices reading a [R, B, Tp, N] array (per round, in position order) at each round's sorted
  order: [B, N, R, Tp]."""
  b, n, r, _ = perm.shape
  return (jnp.arange(r).reshape(1, 1, r, 1),) + _slots(perm)


def _read(x: jax.Array, index: tuple[jax.Array, ...]) -> jax.Array:
  return x.at[index].get(mode='promise_in_bounds')


def _sum_rounds(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """x [R, ...] (times weights, [R, ...] without x's last axis) summed over R, written out (the
  CPU backend's reductions over an outer axis are slow)."""
  term = lambda u: x[u] if weights is None else x[u] * weights[u][..., None]
  return sum(term(u) for u in range(x.shape[0]))


@jax.custom_vjp
def sort_rounds(xs: tuple[jax.Array, ...], perm: jax.Array, inverse: jax.Array
                ) -> tuple[jax.Array, ...]:
  """Each x [B, Tp, N, W] in every round's sorted order, [B, N, R, Tp, W] (perm, inverse from
  `sort_buckets`).

  The gradient reads each round's cotangent at the inverse permutation and sums the rounds: a
  permutation's transpose is its inverse (a gather, not autodiff's scatter-add).
  """
  return tuple(_read(x, _slots(perm)) for x in xs)


def _sort_rounds_fwd(xs, perm, inverse):
  return sort_rounds(xs, perm, inverse), (perm, inverse)


def _sort_rounds_bwd(res, gs):
  perm, inverse = res
  return tuple(_sum_rounds(_read(g, _positions(inverse))) for g in gs), None, None


sort_rounds.defvjp(_sort_rounds_fwd, _sort_rounds_bwd)


def _round_weights(lse: jax.Array, inverse: jax.Array) -> jax.Array:
  """Appendix ("multi-round LSH attention"): [B, N, R, Tp] sorted log-sum-exps -> each round's
  weight exp(lse_r - logsumexp_r lse_r) at each position, [R, B, Tp, N]."""
  lse = _read(lse, _positions(inverse))
  top = jnp.max(lse, axis=0)
  weights = [jnp.exp(x - top) for x in lse]
  total = sum(weights)
  return jnp.stack([w / total for w in weights])


@jax.custom_vjp
def unsort_rounds(out: jax.Array, lse: jax.Array, perm: jax.Array, inverse: jax.Array
                  ) -> jax.Array:
  """The rounds' outputs back in position order and combined: sum_r exp(lse_r - logsumexp_r
  lse_r) out_r (the Pallas path's; the XLA path combines inside `attend_rounds`).

  Args:
    out: [B, N, R, Tp, H] each round's output in its sorted order.
    lse: [B, N, R, Tp] its log-sum-exp.
    perm, inverse: from `sort_buckets`.
  Returns:
    [B, Tp, N, H]. The gradient reads the cotangent at perm (a gather, not a scatter-add).
  """
  return _unsort_rounds_fwd(out, lse, perm, inverse)[0]


def _unsort_rounds_fwd(out, lse, perm, inverse):
  weights = _round_weights(lse, inverse)                              # [R, B, Tp, N]
  combined = _sum_rounds(_read(out, _positions(inverse)), weights)
  return combined, (out, perm, weights, combined)


def _unsort_rounds_bwd(res, g):
  out, perm, weights, combined = res
  at = _slots(perm)
  g_sorted = _read(g, at)                                            # [B, N, R, Tp, H]
  w = _read(weights, _round_slots(perm))
  # d lse_r = w_r (g . out_r - g . out): the softmax over rounds' Jacobian.
  mean = _read(jnp.einsum('BTNH,BTNH->BTN', g, combined), at)
  d_lse = w * (jnp.einsum('BNRTH,BNRTH->BNRT', g_sorted, out) - mean)
  return g_sorted * w[..., None], d_lse, None, None


unsort_rounds.defvjp(_unsort_rounds_fwd, _unsort_rounds_bwd)


def _look_back(x: jax.Array) -> jax.Array:
  """[..., chunks, C, ...] -> [..., chunks, 2C, ...]: each chunk with the previous one (wrapping)."""
  return jnp.concatenate([x, jnp.roll(x, 1, axis=3)], axis=4)


def default_buckets(length: int, bucket_size: int, head_dim: int) -> int:
  """2 T / bucket_size rounded up to an even number >= 2; above 2 * head_dim, if it does not
  factorise, rounded up further to a product of two even numbers near its square root."""
  n = max(2, 2 * math.ceil(length / bucket_size))
  if len(factors(n, head_dim)) == 2 or n <= 2 * head_dim:
    return n
  b1 = 2 * math.ceil(math.sqrt(n) / 2)
  return b1 * 2 * math.ceil(n / b1 / 2)


def check(n_hashes: int, bucket_size: int, n_buckets: int | None, **flags: bool) -> None:
  """Raises ValueError on a bad hyper-parameter (flags: the boolean ones, by name)."""
  if not isinstance(n_hashes, int) or n_hashes < 1:
    raise errors.Error(f'n_hashes={n_hashes!r} must be an int >= 1.')
  if not isinstance(bucket_size, int) or bucket_size < 1:
    raise errors.Error(f'bucket_size={bucket_size!r} must be an int >= 1.')
  if n_buckets is not None and (not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2):
    raise errors.Error(f'n_buckets={n_buckets!r} must be an even int >= 2 (or None: 2 T / '
                       'bucket_size).')
  for name, value in flags.items():
    if not isinstance(value, bool):
      raise errors.Error(f'{name}={value!r} must be True or False.')


class Sorted(NamedTuple):
  """The hash rounds' sorted orders; every array is [B, N, R, Tp, ...], slot-major.

  Attributes:
    q, k, v: [B, N, R, Tp, H] queries, unit keys and values in sorted order.
    pos: [B, N, R, Tp] original positions.
    valid: [B, N, R, Tp] bool, not padding.
    seg: [B, N, R, Tp] segment ids, or None.
    bucket: [B, N, R, Tp] the slot's bucket in its round.
    rounds: None, or (buckets, index) [B, N, R, Tp, R]: the slot's token's bucket and sorted index
      in every round (for the duplicate count).
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  valid: jax.Array
  seg: jax.Array | None
  bucket: jax.Array
  rounds: tuple[jax.Array, jax.Array] | None


def in_window(qb: jax.Array, qi: jax.Array, kb: jax.Array, ki: jax.Array, *, chunk: int,
              chunks: int, band: bool, across: bool) -> jax.Array:
  """Whether a key is in a query's window in one hash round (broadcasting).

  Args:
    qb, kb: the query's and the key's bucket in the round.
    qi, ki: their indices in the round's sorted order.
    chunk: C.
    chunks: Tp / C.
    band: the strictly causal form: the key is the query or among the C sorted positions before
      it, in the same bucket. Otherwise the chunked form: the key's chunk (ki // C) is the query's
      or the one before it (cyclically) and, unless across, the buckets are equal.
    across: attend across buckets (chunked form only).
  """
  if band:
    return (qb == kb) & (ki <= qi) & (qi - ki <= chunk)
  qc, kc = qi // chunk, ki // chunk
  near = (kc == qc) | (kc == (qc - 1) % chunks)
  return near if across else near & (qb == kb)


def _window(s: Sorted, *, mask: Mask, chunk: int, band: bool, across: bool
            ) -> tuple[jax.Array, jax.Array | None]:
  """Which keys of a chunk and the one before each query sees (`in_window` and the mask), and
  -log N_ij when s.rounds is given: (allowed [B, N, R, L, C, S] bool, bias [B, N, R, L, C, S] or
  None), S = 2C (C for a lone chunk), as `attend_rounds` takes them."""
  b, n, r, padded, _ = s.q.shape
  chunks = padded // chunk
  split = lambda x: x.reshape(b, n, r, chunks, chunk, *x.shape[4:])     # [B, N, R, L, C, ...]
  back = (lambda x: _look_back(split(x))) if chunks > 1 else split        # [B, N, R, L, 2C, ...]
  rows, cols = lambda x: split(x)[..., :, None], lambda x: back(x)[..., None, :]
  window = lambda qb, qi: in_window(rows(qb), rows(qi), cols(qb), cols(qi), chunk=chunk,
                                    chunks=chunks, band=band, across=across)
  index = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), s.pos.shape)
  allowed = mask.allowed(rows(s.pos), cols(s.pos), None if s.seg is None else rows(s.seg),
                         None if s.seg is None else cols(s.seg), padded, padded)
  allowed = allowed & cols(s.valid) & window(s.bucket, index)
  if s.rounds is None:
    return allowed, None
  # Appendix ("multi-round LSH attention"): a key found in N_ij of the rounds gets -log N_ij in
  # each, so that the rounds' union counts it once. N_ij >= 1 wherever the pair is allowed here.
  buckets, where = s.rounds
  count = sum(window(buckets[..., u], where[..., u]).astype(jnp.float32) for u in range(r))
  return allowed, -jnp.log(jnp.maximum(count, 1.0))


def _chunk_inputs(q, k, v, chunk):
  """[B, N, R, Tp, H] -> q [B, N, R, L, C, H]; k, v with their look-back [B, N, R, L, S, H]."""
  b, n, r, padded, h = q.shape
  split = lambda x: x.reshape(b, n, r, padded // chunk, chunk, h)
  back = _look_back if padded > chunk else lambda x: x
  return split(q), back(split(k)), back(split(v))


def _own(chunk: int, width: int) -> jax.Array:
  """[C, S] bool: the key slot is the query's own (a chunk's first C key slots are the chunk)."""
  return jnp.arange(chunk)[:, None] == jnp.arange(width)[None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def attend_rounds(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                  bias: jax.Array | None, perm: jax.Array, inverse: jax.Array, chunk: int
                  ) -> jax.Array:
  """Every round's chunked attention in sorted order, back in position order, rounds combined.

  Each chunk's queries attend over the keys of the chunk and the one before (the mask says which);
  a query's own key gets the logit SELF (section 2, "Causal masking for shared-QK attention").
  The rounds combine as the appendix's "multi-round LSH attention": out = sum_r exp(lse_r - lse)
  out_r, lse = logsumexp_r lse_r, which is one softmax over the union of the rounds' windows:
  with P_rij = exp(logit_rij - lse_i), out_i = sum_rj P_rij v_j. The backward is written from
  that (FlashAttention's, Dao et al. 2022, with the global lse): dlogit_rij = P_rij (g_i . v_j -
  g_i . out_i), dv_j = sum_ri P_rij g_i. The forward saves the unnormalised probabilities and
  each slot's factor exp(lse_r - lse) / rowsum; the backward reads the cotangent once in each
  round's order (a gather at perm) and recomputes no mask, count or exponential.

  Args:
    q, k, v: [B, N, R, Tp, H] in each round's sorted order, Tp = L C.
    allowed: bool, broadcastable to [B, N, R, L, C, S] (S = 2C, or C when L = 1): key slot s
      (s < C: the chunk's slot s; else the previous chunk's slot s - C, cyclically) is visible to
      the chunk's query c.
    bias: added to the allowed logits but a query's own (the -log N_ij count), broadcastable
      likewise, or None.
    perm, inverse: [B, N, R, Tp] from `sort_buckets`.
    chunk: C.
  Returns:
    [B, Tp, N, H] float32 in position order; zeros for a query that sees nothing.
  """
  return _attend_rounds_fwd(q, k, v, allowed, bias, perm, inverse, chunk)[0]


def _attend_rounds_fwd(q, k, v, allowed, bias, perm, inverse, chunk):
  qc, kb, vb = _chunk_inputs(q, k, v, chunk)
  logits = jnp.einsum('BNRLCH,BNRLSH->BNRLCS', qc, kb,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  logits = jnp.where(_own(chunk, kb.shape[4]), SELF, logits if bias is None else logits + bias)
  probs, total, lse = softmax(logits, allowed)
  out = jnp.einsum('BNRLCS,BNRLSH->BNRLCH', probs.astype(v.dtype), vb,
                   preferred_element_type=jnp.float32).reshape(q.shape)
  weights = _round_weights(lse.reshape(perm.shape), inverse)         # [R, B, Tp, N]
  at = _positions(inverse)
  factor = weights / _read(total.reshape(perm.shape), at)
  combined = _sum_rounds(_read(out, at), factor)                      # [B, Tp, N, H]
  factor = _read(factor, _round_slots(perm)).reshape(total.shape)
  return combined, (qc, kb, vb, probs, factor, combined, perm)


def _attend_rounds_bwd(chunk, res, g):
  qc, kb, vb, probs, factor, combined, perm = res
  at = _slots(perm)
  # P = probs * factor: dlogit = P (g . v - g . out); the g's in each round's sorted order.
  g_out = _read(g, at).reshape(qc.shape) * factor[..., None]
  row = _read(jnp.einsum('BTNH,BTNH->BTN', g, combined), at).reshape(factor.shape) * factor
  scale = qc.shape[-1] ** -0.5
  grad_scale = jnp.where(_own(chunk, kb.shape[4]), 0.0, scale)      # SELF is a constant logit.
  ds = probs * (jnp.einsum('BNRLCH,BNRLSH->BNRLCS', g_out, vb) - row[..., None]) * grad_scale
  dq = jnp.einsum('BNRLCS,BNRLSH->BNRLCH', ds, kb)
  dk = jnp.einsum('BNRLCS,BNRLCH->BNRLSH', ds, qc)
  dv = jnp.einsum('BNRLCS,BNRLCH->BNRLSH', probs, g_out)
  if kb.shape[4] > chunk:   # A look-back slot's gradient belongs to the previous chunk's key.
    fold = lambda x: x[..., :chunk, :] + jnp.roll(x[..., chunk:, :], -1, axis=3)
    dk, dv = fold(dk), fold(dv)
  shape = perm.shape + (qc.shape[-1],)
  return (dq.reshape(shape).astype(qc.dtype), dk.reshape(shape).astype(kb.dtype),
          dv.reshape(shape).astype(vb.dtype), None, None, None, None)


attend_rounds.defvjp(_attend_rounds_fwd, _attend_rounds_bwd)


def _sorted_kernel(s: Sorted, *, mask: Mask, chunk: int, band: bool, across: bool,
                   n_buckets: int) -> tuple[jax.Array, jax.Array]:
  """`_sorted_xla` (without duplicate counts) through the block-sparse kernel: each (head, round)
  is a lane whose tiles are the chunks; tile i visits tiles i and i - 1.

  The same-bucket rule travels in the segment ids (segment * n_buckets + bucket). The band form
  gives the kernel sorted indices as positions: within a bucket the sort keeps the original order,
  so the causal rule on them is the causal rule, and the band is the in-tile pattern.
  """
  b, n, r, padded, h = s.q.shape
  chunks = padded // chunk
  # Tile i looks back to i - 1 (cyclically), but for a lone tile and the band's first tile.
  back = np.asarray([chunks > 1 and (i > 0 or not band) for i in range(chunks)])
  tiles = np.arange(chunks)
  blocks = np.stack([tiles, np.where(back, (tiles - 1) % chunks, tiles)], -1)[None].astype(np.int32)
  count = (1 + back[None]).astype(np.int32)
  flags = np.full_like(blocks, int(band))
  pattern = (lambda qp, kp, head: qp - kp <= chunk) if band else None
  spec = flash_attention.Spec(chunk, blocks, flags, count, pattern, mask.causal, padded, padded,
                              h ** -0.5, kernels.interpret(), self_logit=SELF)
  lanes = lambda x: x.reshape(b, n * r, padded, *x.shape[4:])       # [B, N * R, Tp, ...]
  seq = lambda x: jnp.moveaxis(lanes(x), 1, 2)                      # [B, Tp, N * R, H]
  ids = s.seg
  if not across:
    ids = s.bucket if ids is None else ids * n_buckets + s.bucket
  pos = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), s.pos.shape) if band else s.pos
  segs = {} if ids is None else dict(q_seg=lanes(ids), k_seg=lanes(ids))
  out, lse = flash_attention.attend_slots(
      seq(s.q), seq(s.k), seq(s.v), spec=spec, q_pos=lanes(pos),
      k_pos=lanes(jnp.where(s.valid, pos, -1)), **segs)
  return (jnp.moveaxis(out, 2, 1).reshape(b, n, r, padded, h),
          jnp.moveaxis(lse, 2, 1).reshape(b, n, r, padded))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, rng: jax.Array,
           n_hashes: int = 1, bucket_size: int = 64, n_buckets: int | None = None,
           attend_across_buckets: bool = False, allow_duplicates: bool = False,
           causal_band: bool = True, impl: str = 'xla') -> jax.Array:
  """LSH attention with shared QK.

  Args:
    q: [B, T, N, H] queries.
    k: [B, T, N, H] keys before normalisation (shared QK: the layer passes q); the keys are k / |k|.
    v: [B, T, K, H] values; K divides N.
    mask: causal flag and segment ids (self-attention: T = S).
    rng: the key the rotations are drawn from (a fresh one per training step).
    n_hashes: R, hash rounds.
    bucket_size: C, the chunk length (and the band's width).
    n_buckets: buckets per round (even); default 2 T / bucket_size (see `default_buckets`);
      factorised above 2 H (see `factors`).
    attend_across_buckets: False (the paper, Eq. 3's P_i): a query sees only keys of its own
      bucket; True: every key of its chunk and the one before (the chunked form only).
    allow_duplicates: False (the paper's appendix): a key found in several rounds counts once
      (-log N_ij); True: once per round.
    causal_band: with a causal mask, True (the default) is the strictly causal band form (see the
      module docstring); False is the chunked form, whose outputs can depend on future tokens.
      No effect without a causal mask.
    impl: 'xla' (the chunks gathered with their look-back, here) or 'pallas': the sorted sequence
      as a block layout (chunk i visits chunks i and i - 1) through efflong.kernels.flash_attention,
      positions and segment ids carried per lane. The duplicate count (n_hashes > 1 with
      allow_duplicates=False) has no Pallas path: 'pallas' refuses it, 'auto' uses XLA.
  Returns:
    [B, T, N, H]; a token that sees no key gets zeros.
  """
  check(n_hashes, bucket_size, n_buckets, attend_across_buckets=attend_across_buckets,
        allow_duplicates=allow_duplicates, causal_band=causal_band)
  b, t, n, h = q.shape
  if k.shape != q.shape or v.shape[:2] != (b, t) or v.shape[3] != h or n % v.shape[2]:
    raise errors.Error(f'lsh attention is shared-QK self-attention: q and k [B, T, N, H], v '
                       f'[B, T, K, H]; got q {q.shape}, k {k.shape}, v {v.shape}.')
  mask.check(b, t, t)
  if mask.global_tokens is not None:
    raise errors.Error("lsh attention has no global tokens, but the mask (the batch field "
                       "'global_tokens') sets some; use longformer or bigbird.")
  band = mask.causal and causal_band
  if band and attend_across_buckets:
    raise errors.Error('lsh causal_band=True needs attend_across_buckets=False: keys of other '
                       'buckets among the previous sorted positions depend on future tokens; set '
                       'causal_band=False for the chunked form.')
  dedup = n_hashes > 1 and not allow_duplicates
  if dedup and impl == 'pallas':
    raise errors.Error("lsh with n_hashes > 1 and allow_duplicates=False (the -log N_ij count) has "
                       "no Pallas path; use attention_impl='xla' or 'auto', or "
                       "allow_duplicates=True.")
  n_buckets = default_buckets(t, bucket_size, h) if n_buckets is None else n_buckets
  v = jnp.repeat(v, n // v.shape[2], axis=2)
  chunk = min(bucket_size, t)
  if dedup:
    if kernels.resolve(impl) == 'pallas':
      logging.log_first_n(logging.WARNING, 'lsh: the duplicate count (allow_duplicates=False) '
                          'runs in XLA, not the Pallas kernel.', 1)
    impl = 'xla'
  impl = kernels.resolve(impl, tile=chunk)
  padded = -(-t // chunk) * chunk
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
  q, k, v = pad(q), _unit(pad(k)), pad(v)
  rot = rotations(rng, num_heads=n, n_hashes=n_hashes, head_dim=h, n_buckets=n_buckets)
  bucket = buckets(k, rot, n_buckets)                                 # [B, N, R, Tp]
  ordered, perm, inverse = sort_buckets(bucket, n_buckets)
  # Every round's value at each slot's token: [B, N, R', Tp] -> [B, N, R, Tp, R'].
  everywhere = lambda x: jnp.moveaxis(
      jnp.take_along_axis(x[:, :, None], perm[:, :, :, None], axis=-1), 3, -1)
  seg = mask.q_segment_ids
  # (Normalising the sorted queries instead of gathering k costs more: XLA fuses the
  # normalisation's gradient into the dq matmul, 20% slower in all, measured.)
  sq, sk, sv = sort_rounds((q, k, v), perm, inverse)
  s = Sorted(
      sq, sk, sv, perm, perm < t,
      None if seg is None else _read(pad(seg), _slots(perm)[:2]),
      ordered, (everywhere(bucket), everywhere(inverse)) if dedup else None)

  if impl == 'pallas':
    out, lse = _sorted_kernel(s, mask=mask, chunk=chunk, band=band, across=attend_across_buckets,
                              n_buckets=n_buckets)
    out = unsort_rounds(out, lse, perm, inverse)
  else:
    allowed, bias = _window(s, mask=mask, chunk=chunk, band=band, across=attend_across_buckets)
    out = attend_rounds(s.q, s.k, s.v, allowed, bias, perm, inverse, chunk)
  return out[:, :t].astype(q.dtype)


def _unit(x: jax.Array) -> jax.Array:
  """x / |x| over the last axis (the shared-QK keys; + 1e-6 under the root)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6
                           ).astype(x.dtype)


def init_cache(batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype: Any,
               n_hashes: int = 1, bucket_size: int = 64,
               n_buckets: int | None = None) -> dict[str, jax.Array]:
  """The empty decoding cache of the causal band form (see `attend_step`).

  Args:
    batch: B.
    max_len: S, the longest sequence. n_buckets=None takes `default_buckets(max_len, ...)`: the
      count `attend` would take over max_len positions.
    num_kv_heads: N (shared QK: the keys are the queries, one per head).
    head_dim, dtype: H and the cached keys' and values' dtype.
    n_hashes, bucket_size, n_buckets: as `attend`.
  Returns:
    'length' [B] int32; 'k' [B, S, N, H] the unit keys; 'v' [B, S, N, H]; 'ring' [B, N, R,
    n_buckets, C] int32, C = min(bucket_size, S): per head, round and bucket, the positions of its
    C most recent keys (-1: none yet).
  """
  check(n_hashes, bucket_size, n_buckets)
  n_buckets = default_buckets(max_len, bucket_size, head_dim) if n_buckets is None else n_buckets
  kv = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
  return {'length': jnp.zeros((batch,), jnp.int32), 'k': kv, 'v': kv,
          'ring': jnp.full((batch, num_kv_heads, n_hashes, n_buckets, min(bucket_size, max_len)),
                           -1, jnp.int32)}


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, rng: jax.Array, n_hashes: int = 1, bucket_size: int = 64,
                n_buckets: int | None = None, attend_across_buckets: bool = False,
                allow_duplicates: bool = False, causal_band: bool = True
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The causal band form of `attend` for new positions after the cached ones.

  In each round a query sees its own key (logit SELF) and the C most recent earlier keys of its
  bucket: the cache's ring of that bucket, read by index (O(R C H) per token and head, flat in
  the context by design). Measured, a step still grows with the cache (55x from 1K to 64K
  cached positions, experiments/results/decode_cpu.md), as dense's does beyond its reads: some
  whole-cache traffic per step remains to be found (issue 19's profiling). With n_hashes > 1 and allow_duplicates=False a key in the query's window in N_ij
  rounds gets -log N_ij, N_ij counted over the query's rings. The new positions are taken one at a
  time (a scan: a prefill of T positions is T such steps).

  Args:
    q: [B, T, N, H] the new queries.
    k: [B, T, N, H] their keys before normalisation (shared QK: q).
    v: [B, T, N, H] (the layer makes K = N for shared QK).
    cache: from `init_cache` with the same n_hashes, bucket_size and n_buckets.
    mask: q_segment_ids [B, T]: 1 on real new positions, 0 on right-padding (None: all real).
    rng: the key the rotations are drawn from (the one the cache was filled with).
    n_hashes, bucket_size, n_buckets, allow_duplicates: as `attend`.
    attend_across_buckets, causal_band: must be False and True (the strictly causal form).
  Returns:
    out [B, T, N, H], equal to the causal `attend` over all the row's positions (with the cache's
    n_buckets) at each real new one, and the cache advanced past the real positions.
  """
  check(n_hashes, bucket_size, n_buckets, attend_across_buckets=attend_across_buckets,
        allow_duplicates=allow_duplicates, causal_band=causal_band)
  if attend_across_buckets or not causal_band:
    raise errors.Error(f'lsh decodes only the strictly causal band (causal_band=True, '
                       f'attend_across_buckets=False); got causal_band={causal_band}, '
                       f'attend_across_buckets={attend_across_buckets}, whose outputs depend on '
                       'future tokens.')
  b, t, n, h = q.shape
  ring = cache['ring']
  _, _, rounds, nb, c = ring.shape
  s_max = cache['k'].shape[1]
  if (rounds, c) != (n_hashes, min(bucket_size, s_max)) or n_buckets not in (None, nb):
    raise errors.Error(f'lsh cache built for n_hashes={rounds}, n_buckets={nb}, ring {c} wide; '
                       f'got n_hashes={n_hashes}, bucket_size={bucket_size}, n_buckets={n_buckets} '
                       '(init_cache takes the same ones).')
  if k.shape != q.shape or v.shape != q.shape or cache['k'].shape[2:] != (n, h):
    raise errors.Error(f'lsh decoding is shared-QK self-attention with N heads of keys and values: '
                       f'q, k, v [B, T, N, H] and a cache for {cache["k"].shape[2]} heads; got q '
                       f'{q.shape}, k {k.shape}, v {v.shape}.')
  real = jnp.ones((b, t), bool) if mask.q_segment_ids is None else mask.q_segment_ids != 0
  k = _unit(k)
  rot = rotations(rng, num_heads=n, n_hashes=rounds, head_dim=h, n_buckets=nb)
  bucket = jnp.moveaxis(buckets(k, rot, nb), 3, 0)                     # [T, B, N, R]
  pos = cache['length'][None] + jnp.arange(t)[:, None]                 # [T, B]
  dedup = rounds > 1 and not allow_duplicates
  bi, ni, ri = jnp.ix_(jnp.arange(b), jnp.arange(n), jnp.arange(rounds))

  def one(state, x):
    keys, values, ring = state
    q_t, k_t, v_t, bucket_t, pos_t, real_t = x        # [B, N, H] (3), [B, N, R], [B], [B]
    rows = ring[bi, ni, ri, bucket_t]                  # [B, N, R, C]: the window's positions
    at = (bi[..., None], jnp.maximum(rows, 0), ni[..., None])
    window = lambda own, cached: jnp.concatenate(     # [B, N, R, 1 + C, H]: self first
        [jnp.broadcast_to(own[:, :, None, None], (b, n, rounds, 1, h)), cached[at]], axis=3)
    wk, wv = window(k_t, keys), window(v_t, values)
    window_pos = jnp.concatenate([jnp.broadcast_to(pos_t[:, None, None, None], (b, n, rounds, 1)),
                             rows], axis=3)            # [B, N, R, 1 + C]
    logits = jnp.einsum('BNH,BNRCH->BNRC', q_t, wk, preferred_element_type=jnp.float32) * h ** -0.5
    if dedup:  # N_ij: the rounds whose window (ring) of the query holds the key.
      count = jnp.sum(jnp.any(window_pos[..., None, None] == rows[:, :, None, None], -1), -1)
      logits = logits - jnp.log(jnp.maximum(count, 1).astype(jnp.float32))
    logits = jnp.where(jnp.arange(1 + c) == 0, SELF, logits)
    probs, total, lse = softmax(logits, window_pos >= 0)
    out = jnp.einsum('BNRC,BNRCH->BNRH', probs.astype(wv.dtype), wv,
                     preferred_element_type=jnp.float32) / total[..., None]
    out = jnp.sum(out * jax.nn.softmax(lse, axis=2)[..., None], axis=2)   # [B, N, H]
    # Write a real position: its key and value, and in each round's ring over the oldest slot.
    slot = jnp.where(real_t, pos_t, s_max)                                # s_max: dropped
    keys = keys.at[jnp.arange(b), slot].set(k_t.astype(keys.dtype), mode='drop')
    values = values.at[jnp.arange(b), slot].set(v_t.astype(values.dtype), mode='drop')
    oldest = jnp.arange(c) == jnp.argmin(rows, axis=-1)[..., None]
    ring = ring.at[bi, ni, ri, bucket_t].set(
        jnp.where(oldest & real_t[:, None, None, None], pos_t[:, None, None, None], rows))
    return (keys, values, ring), out

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  (keys, values, ring), out = jax.lax.scan(
      one, (cache['k'], cache['v'], ring),
      (time_major(q), time_major(k), time_major(v), bucket, pos, time_major(real)))
  new = dict(cache, length=cache['length'] + real.sum(1, dtype=jnp.int32), k=keys, v=values,
             ring=ring)
  return time_major(out).astype(q.dtype), new


class HashKey(nnx.Variable):
  """A non-trainable variable: the raw data of the key the rotations are drawn from."""


class HashRng(nnx.Module):
  """Owns the layer's hashing key; x [B, T, D] -> {'rng': key}. `reseed` renews it every step."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.key = HashKey(jax.random.key_data(rngs.params()))

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    del x
    return {'rng': jax.random.wrap_key_data(self.key[...])}


def hash_rng(hyper: dict[str, Any], *, rngs: nnx.Rngs, **layer: Any) -> HashRng:
  """The family module (checks the hyper-parameters when the model is built)."""
  del layer
  check(hyper.get('n_hashes', 1), hyper.get('bucket_size', 64), hyper.get('n_buckets'),
        **{name: hyper[name] for name in FLAGS if name in hyper})
  return HashRng(rngs=rngs)


def reseed(model: nnx.Module, key: jax.Array, step: jax.Array) -> None:
  """Fresh rotations for every LSH layer of model at each training step: its key becomes
  fold_in(key, layer index), key being the trainer's per-step key. Evaluation keeps the last one."""
  del step  # The trainer's key already depends on the step.
  for i, (_, module) in enumerate(nnx.iter_graph(model)):
    if isinstance(module, HashRng):
      module.key[...] = jax.random.key_data(jax.random.fold_in(key, i))
