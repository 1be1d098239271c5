"""Reference softmax attention (Vaswani et al. 2017): every other family is tested against it.

O(T * S) time and memory; it is the slow, obviously correct twin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efflong.attention.mask import Mask

# Finite, so a row that sees no key gives a uniform softmax (then zeroed) rather than NaN.
NEG_INF = -1e30


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> None:
  """Raises ValueError on q/k/v/mask shapes that do not fit [B, T, N, H] / [B, S, K, H]."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be [B, T, N, H] / [B, S, K, H]; got ranks {q.ndim}, {k.ndim}, '
                     f'{v.ndim}.')
  b, t, n, h = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f'k and v must be [B={b}, S, K, H={h}]; got k {k.shape}, v {v.shape}.')
  if n % k.shape[2]:
    raise ValueError(f'Key/value heads K={k.shape[2]} must divide query heads N={n}.')
  mask.check(b, t, k.shape[1])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask,
           scale: float | None = None) -> jax.Array:
  """Full softmax attention.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; K divides N (grouped-query attention when K < N).
    v: [B, S, K, H] values.
    mask: which keys each query sees.
    scale: logit scale; default H ** -0.5.
  Returns:
    [B, T, N, H]; a query that sees no key gets zeros.
  """
  check_shapes(q, k, v, mask)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]: G query heads share one kv head.
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k, preferred_element_type=jnp.float32) * scale
  allowed = mask.materialize(t, s)[:, None, None]  # [B|1, 1, 1, T, S]
  logits = jnp.where(allowed, logits, NEG_INF)
  probs = jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs.astype(v.dtype), v)
  return out.reshape(b, t, n, h)
