"""Reference softmax attention (Vaswani et al. 2017): every other family is tested against it.

O(T * S) time and memory; it is the slow, obviously correct twin.
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
