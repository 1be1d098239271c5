"""Masks as values: a causal flag and segment ids, never a dense T x S array.

A query sees a key when their segment ids are equal and, if causal, the key is not in the query's
future. Padding is segment id 0 on pad tokens; packed sequences get one id each (1, 2, ...), so
padding and packing are the same mechanism.

When T != S and the mask is causal, queries are aligned to the end of the keys: query t sits at
key position S - T + t (the layout of decoding with a cache or a memory of S - T earlier keys).

`softmax` is what a mask does to logits, shared by every family's softmax and its kernels' twins.

A leaf: it imports nothing of efflong but efflong.errors, so that efflong.kernels and
efflong.attention both build on it without importing each other.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from efflong import errors

# The logit of a pair the mask forbids: finite, so a row that sees no key gives a uniform softmax
# (then zeroed) rather than NaN.
NEG_INF = -1e30

# An elementwise mask on (query position, key position, query head), broadcasting: the in-block
# pattern of a block-sparse layout (efflong.attention.blocksparse), also read by the kernels.
Pattern = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@struct.dataclass
class Mask:
  """Which keys each query may see.

  Attributes:
    causal: whether a query is barred from keys in its future.
    q_segment_ids: [B, T] int segment id of each query, or None (one segment).
    kv_segment_ids: [B, S] int segment id of each key, or None (one segment).
    global_tokens: [B, T] bool, positions with full attention in self-attention (they see every
      key and every query sees them), or None. A restriction-free family (dense) needs nothing
      more; the sparse families that support them (longformer, bigbird) add these rows and
      columns to their pattern; the others refuse a mask that has them.
  """

  causal: bool = struct.field(pytree_node=False, default=False)
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  global_tokens: jax.Array | None = None

  @classmethod
  def from_segments(cls, segment_ids: jax.Array | None, *, causal: bool,
                    global_tokens: jax.Array | None = None) -> Mask:
    """Self-attention mask where queries and keys share one [B, T] segment id array."""
    return cls(causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
               global_tokens=global_tokens)

  def check(self, batch: int, q_len: int, kv_len: int) -> None:
    """Raises ValueError when the segment ids disagree with q [B, T] / k [B, S] shapes."""
    if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
      raise errors.Error('Mask needs both q_segment_ids and kv_segment_ids, or neither.')
    for name, ids, length in (('q_segment_ids', self.q_segment_ids, q_len),
                              ('kv_segment_ids', self.kv_segment_ids, kv_len)):
      if ids is not None and tuple(ids.shape) != (batch, length):
        raise errors.Error(f'Mask.{name} has shape {tuple(ids.shape)}; expected {(batch, length)}.')
    if self.global_tokens is not None and (tuple(self.global_tokens.shape) != (batch, q_len)
                                           or q_len != kv_len):
      raise errors.Error(f'Mask.global_tokens has shape {tuple(self.global_tokens.shape)}; '
                         f'expected {(batch, q_len)} in self-attention (T == S; here S={kv_len}).')
    if self.causal and q_len > kv_len:
      raise errors.Error(f'A causal mask needs T <= S; got T={q_len}, S={kv_len}.')

  def allowed(self, q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
              k_seg: jax.Array | None, q_len: int, kv_len: int) -> jax.Array:
    """Elementwise visibility of keys at k_pos to queries at q_pos (broadcasting).

    Every family's in-block mask is this function, evaluated on whatever positions it gathers.

    Args:
      q_pos: query positions in [0, T).
      k_pos: key positions in [0, S).
      q_seg: segment ids gathered at q_pos, or None.
      k_seg: segment ids gathered at k_pos, or None.
      q_len: T.
      kv_len: S.
    Returns:
      A boolean array of the broadcast shape.
    """
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
    if self.causal:
      ok = ok & (k_pos <= q_pos + (kv_len - q_len))
    if q_seg is not None:
      ok = ok & (q_seg == k_seg)
    return ok

  def materialize(self, q_len: int, kv_len: int) -> jax.Array:
    """The explicit [B or 1, T, S] boolean mask. For the dense reference and tests only."""
    q_pos = jnp.arange(q_len)[None, :, None]
    k_pos = jnp.arange(kv_len)[None, None, :]
    q_seg = None if self.q_segment_ids is None else self.q_segment_ids[:, :, None]
    k_seg = None if self.kv_segment_ids is None else self.kv_segment_ids[:, None, :]
    return self.allowed(q_pos, k_pos, q_seg, k_seg, q_len, kv_len)


def softmax(logits: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked softmax over the last axis, safe for rows that allow nothing.

  Args:
    logits: [..., S] float32 scaled logits.
    allowed: bool, broadcastable to logits.
  Returns:
    probs (unnormalised, exp(logit - max)), their row sums [...], and the row log-sum-exp [...]
    (NEG_INF for a row with no allowed key; such a row's probs are all zero).
  """
  logits = jnp.where(allowed, logits, NEG_INF)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.where(allowed, jnp.exp(logits - peak), 0.0)
  total = jnp.sum(probs, axis=-1)
  seen = total > 0
  lse = jnp.where(seen, peak[..., 0] + jnp.log(jnp.where(seen, total, 1.0)), NEG_INF)
  return probs, jnp.where(seen, total, 1.0), lse
