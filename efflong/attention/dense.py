"""Reference softmax attention (Vaswani et al. 2017): every other family is tested against it.

O(T * S) time and memory; it is the slow, obviously correct twin. Decoding keeps every key and
value in a preallocated cache (init_cache / attend_step, shared by the sparse families).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efflong import errors, kernels
from efflong.attention import blocksparse
from efflong.mask import Mask, softmax


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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask,
           scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """Full softmax attention.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; K divides N (grouped-query attention when K < N).
    v: [B, S, K, H] values.
    mask: which keys each query sees.
    scale: logit scale; default H ** -0.5.
    impl: 'xla' (the explicit T x S computation here) or 'pallas' (the FlashAttention kernels
      over `blocksparse.dense_layout`: every key tile, or those up to the diagonal).
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
  else:
    out, _ = attend_allowed(q, k, v, mask.materialize(t, s)[:, None], scale)
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
  caller keeps lengths within it).

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
  slots = jnp.arange(ck.shape[1])
  allowed = (slots <= positions[:, :, None]) & (slots < length[:, None, None])  # [B, T, S_max]
  scale = q.shape[3] ** -0.5 if scale is None else scale
  out, _ = attend_allowed(q, ck, cv, allowed[:, None], scale)
  return out.astype(q.dtype), {'k': ck, 'v': cv, 'length': length}
