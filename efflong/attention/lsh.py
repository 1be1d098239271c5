"""Reformer LSH attention (Kitaev, Kaiser, Levskaya 2020, section 2).

Per hash round r and head n: the keys (shared QK: the unit-normalised queries) are hashed by a random
rotation, h(x) = argmax([x R; -x R]) with R [H, n_buckets / 2] (section 2, "Locality sensitive
hashing", after Andoni et al. 2015); positions are sorted by (bucket, position), the sorted sequence is
split into chunks of `bucket_size`, and each chunk's queries attend to the keys of their own chunk and
of the previous one (wrapping around). Outputs are unsorted and the rounds combined by the softmax of
their log-sum-exps (section 2, "Multi-round LSH attention"): out = sum_r exp(lse_r - lse) out_r.

Masks, as values carried along the sort: causal through the original positions, segment ids for
padding and packing, and a token never attends to itself unless nothing else is available (its logit
is SELF, a large negative, section 2 "Causal masking for shared-QK attention"). T is padded inside to
a multiple of bucket_size. Memory is O(n_hashes * T * bucket_size).

Causal caveat (a property of the method, not of this code): no query gives weight to a future key,
but the sort is over the whole sequence, so a future token's bucket can shift the chunk boundaries
and change which past keys share a query's chunk. Outputs at t can therefore move when a token after
t changes, unless one chunk holds the whole sequence (bucket_size >= T).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efflong import kernels
from efflong.attention.mask import Mask, softmax
from efflong.kernels import flash_attention

SELF = -1e5  # A token's logit for itself: below any real logit, above a masked one.


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


@jax.custom_vjp
def permute(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
  """x [B, N, R, T, ...] gathered along T by perm [B, N, R, T] (inverse: its inverse).

  Its gradient is the gather by the inverse permutation, not a scatter-add.
  """
  return _gather(x, perm)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - index.ndim)), axis=3)


def _permute_fwd(x, perm, inverse):
  return _gather(x, perm), (perm, inverse)


def _permute_bwd(res, g):
  perm, inverse = res
  return _gather(g, inverse), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


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


def check(n_hashes: int, bucket_size: int, n_buckets: int | None) -> None:
  """Raises ValueError on a bad hyper-parameter."""
  if not isinstance(n_hashes, int) or n_hashes < 1:
    raise ValueError(f'n_hashes={n_hashes!r} must be an int >= 1.')
  if not isinstance(bucket_size, int) or bucket_size < 1:
    raise ValueError(f'bucket_size={bucket_size!r} must be an int >= 1.')
  if n_buckets is not None and (not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2):
    raise ValueError(f'n_buckets={n_buckets!r} must be an even int >= 2 (or None: 2 T / '
                     'bucket_size).')


def _sorted_xla(sq: jax.Array, sk: jax.Array, sv: jax.Array, spos: jax.Array, svalid: jax.Array,
                sseg: jax.Array | None, *, mask: Mask, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Attention within the sorted sequence: each chunk over itself and the previous chunk.

  Args:
    sq, sk, sv: [B, N, R, Tp, H] queries, unit keys and values in sorted order.
    spos: [B, N, R, Tp] original positions; svalid: [B, N, R, Tp] bool, not padding.
    sseg: [B, N, R, Tp] segment ids, or None.
    mask: its causal flag applies on the original positions.
    chunk: C, dividing Tp.
  Returns:
    out [B, N, R, Tp, H] and lse [B, N, R, Tp], float32, in sorted order.
  """
  b, n, r, padded, h = sq.shape
  chunks = padded // chunk
  split = lambda x: x.reshape(b, n, r, chunks, chunk, *x.shape[4:])
  sq, sk, sv, qpos, kpos, kvalid = map(split, (sq, sk, sv, spos, spos, svalid))
  qseg = kseg = None if sseg is None else split(sseg)
  if chunks > 1:
    sk, sv, kpos, kvalid = map(_look_back, (sk, sv, kpos, kvalid))
    kseg = None if kseg is None else _look_back(kseg)
  logits = jnp.einsum('BNRLCH,BNRLSH->BNRLCS', sq, sk,
                      preferred_element_type=jnp.float32) * h ** -0.5
  qp, kp = qpos[..., :, None], kpos[..., None, :]
  allowed = mask.allowed(qp, kp, None if qseg is None else qseg[..., :, None],
                         None if kseg is None else kseg[..., None, :], padded, padded)
  allowed = allowed & kvalid[..., None, :]
  logits = jnp.where(qp == kp, SELF, logits)
  probs, total, lse = softmax(logits, allowed)
  out = jnp.einsum('BNRLCS,BNRLSH->BNRLCH', probs.astype(sv.dtype), sv,
                   preferred_element_type=jnp.float32) / total[..., None]
  return out.reshape(b, n, r, padded, h), lse.reshape(b, n, r, padded)


def _sorted_kernel(sq: jax.Array, sk: jax.Array, sv: jax.Array, spos: jax.Array,
                   svalid: jax.Array, sseg: jax.Array | None, *, mask: Mask,
                   chunk: int) -> tuple[jax.Array, jax.Array]:
  """`_sorted_xla` through the block-sparse kernel: each (head, round) is a lane whose tiles are the
  chunks; tile i visits tiles i and i - 1 (wrapping), with the lane's positions and ids."""
  b, n, r, padded, h = sq.shape
  chunks = padded // chunk
  visits = [[i, (i - 1) % chunks] if chunks > 1 else [i] for i in range(chunks)]
  blocks = np.asarray(visits, np.int32)[None]
  spec = flash_attention.Spec(chunk, blocks, np.zeros_like(blocks),
                              np.full(blocks.shape[:2], blocks.shape[2], np.int32), None,
                              mask.causal, padded, padded, h ** -0.5, kernels.interpret(),
                              self_logit=SELF)
  lanes = lambda x: x.reshape(b, n * r, padded, *x.shape[4:])       # [B, N * R, Tp, ...]
  seq = lambda x: jnp.moveaxis(lanes(x), 1, 2)                      # [B, Tp, N * R, H]
  segs = {} if sseg is None else dict(q_seg=lanes(sseg), k_seg=lanes(sseg))
  out, lse = flash_attention.attend_slots(
      seq(sq), seq(sk), seq(sv), spec=spec, q_pos=lanes(spos),
      k_pos=lanes(jnp.where(svalid, spos, -1)), **segs)
  return (jnp.moveaxis(out, 2, 1).reshape(b, n, r, padded, h),
          jnp.moveaxis(lse, 2, 1).reshape(b, n, r, padded))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, rng: jax.Array,
           n_hashes: int = 1, bucket_size: int = 64, n_buckets: int | None = None,
           impl: str = 'xla') -> jax.Array:
  """LSH attention with shared QK.

  Args:
    q: [B, T, N, H] queries.
    k: [B, T, N, H] keys before normalisation (shared QK: the layer passes q); the keys are k / |k|.
    v: [B, T, K, H] values; K divides N.
    mask: causal flag and segment ids (self-attention: T = S).
    rng: the key the rotations are drawn from (a fresh one per training step).
    n_hashes: R, hash rounds.
    bucket_size: C, the chunk length.
    n_buckets: buckets per round (even); default 2 T / bucket_size (see `default_buckets`);
      factorised above 2 H (see `factors`).
    impl: 'xla' (the chunks gathered with their look-back, here) or 'pallas': the sorted sequence
      as a block layout (chunk i visits chunks i and i - 1) through efflong.kernels.flash_attention,
      positions and segment ids carried per lane.
  Returns:
    [B, T, N, H]; a token that sees no key gets zeros.
  """
  check(n_hashes, bucket_size, n_buckets)
  b, t, n, h = q.shape
  if k.shape != q.shape or v.shape[:2] != (b, t) or v.shape[3] != h or n % v.shape[2]:
    raise ValueError(f'lsh attention is shared-QK self-attention: q and k [B, T, N, H], v '
                     f'[B, T, K, H]; got q {q.shape}, k {k.shape}, v {v.shape}.')
  mask.check(b, t, t)
  if mask.global_tokens is not None:
    raise ValueError("lsh attention has no global tokens, but the mask (the batch field "
                     "'global_tokens') sets some; use longformer or bigbird.")
  n_buckets = default_buckets(t, bucket_size, h) if n_buckets is None else n_buckets
  v = jnp.repeat(v, n // v.shape[2], axis=2)
  chunk = min(bucket_size, t)
  impl = kernels.resolve(impl, tile=chunk)
  padded = -(-t // chunk) * chunk
  valid = jnp.broadcast_to(jnp.arange(padded) < t, (b, padded))
  seg = mask.q_segment_ids
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
  q, k, v = pad(q), pad(k), pad(v)
  seg = None if seg is None else pad(seg)

  k = k * jax.lax.rsqrt(jnp.sum(jnp.square(k.astype(jnp.float32)), -1, keepdims=True) + 1e-6
                        ).astype(k.dtype)
  rot = rotations(rng, num_heads=n, n_hashes=n_hashes, head_dim=h, n_buckets=n_buckets)
  bucket = buckets(k, rot, n_buckets)                                 # [B, N, R, T]
  pos = jnp.arange(padded, dtype=jnp.int32)
  perm = jnp.argsort(bucket * padded + pos, axis=-1).astype(jnp.int32)
  inverse = jnp.argsort(perm, axis=-1).astype(jnp.int32)
  heads = lambda x: jnp.broadcast_to(jnp.moveaxis(x, 2, 1)[:, :, None],
                                     (b, n, n_hashes, padded, h))  # [B, T, N, H] -> [B, N, R, T, H]
  rows = lambda x: jnp.broadcast_to(x[:, None, None], (b, n, n_hashes, padded))
  sq, sk, sv = (permute(heads(x), perm, inverse) for x in (q, k, v))
  spos = jnp.take_along_axis(rows(pos[None]), perm, axis=-1)
  svalid = jnp.take_along_axis(rows(valid), perm, axis=-1)
  sseg = None if seg is None else jnp.take_along_axis(rows(seg), perm, axis=-1)

  sorted_attend = _sorted_kernel if impl == 'pallas' else _sorted_xla
  out, lse = sorted_attend(sq, sk, sv, spos, svalid, sseg, mask=mask, chunk=chunk)
  out = permute(out, inverse, perm)
  lse = permute(lse, inverse, perm)
  if n_hashes > 1:   # Section 2: the rounds weighted by exp(lse_r - logsumexp_r lse_r).
    out = jnp.sum(out * jax.nn.softmax(lse, axis=2)[..., None], axis=2)
  else:
    out = out[:, :, 0]
  return jnp.moveaxis(out, 1, 2)[:, :t].astype(q.dtype)


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
  check(hyper.get('n_hashes', 1), hyper.get('bucket_size', 64), hyper.get('n_buckets'))
  return HashRng(rngs=rngs)


def reseed(model: nnx.Module, key: jax.Array, step: jax.Array) -> None:
  """Fresh rotations for every LSH layer of model at each training step: its key becomes
  fold_in(key, layer index), key being the trainer's per-step key. Evaluation keeps the last one."""
  del step  # The trainer's key already depends on the step.
  for i, (_, module) in enumerate(nnx.iter_graph(model)):
    if isinstance(module, HashRng):
      module.key[...] = jax.random.key_data(jax.random.fold_in(key, i))
