"""The multi-head attention layer: projections around a registered attention family."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from efflong import attention
from efflong.attention import Mask
from efflong.nn.layers import Dtype, partitioned


class Attention(nnx.Module):
  """Projections q, k, v, o around `attention.get(family).attend`.

  The family and its hyper-parameters are static: a model for other hyper-parameters (an eval-time
  override) is a second graph over the same parameters.
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
               family: str = 'dense', family_kw: dict[str, Any] | None = None, causal: bool,
               dtype: Dtype, rngs: nnx.Rngs):
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f'model.num_kv_heads={num_kv_heads} must divide num_heads={num_heads}.')
    self.causal = causal
    self.attend = attention.get(family).bind(causal=causal, **(family_kw or {}))
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))

    def proj(heads: int) -> nnx.Einsum:
      return nnx.Einsum('BTD,DNH->BTNH', (d_model, heads, head_dim), dtype=dtype, rngs=rngs,
                        kernel_init=partitioned(init, 'embed', 'heads', 'head_dim'))

    self.q, self.k, self.v = proj(num_heads), proj(num_kv_heads), proj(num_kv_heads)
    self.o = nnx.Einsum('BTNH,NHD->BTD', (num_heads, head_dim, d_model), dtype=dtype, rngs=rngs,
                        kernel_init=partitioned(nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                                                'heads', 'head_dim', 'embed'))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None,
               context: jax.Array | None = None,
               context_segment_ids: jax.Array | None = None) -> jax.Array:
    """Self-attention over x, or cross-attention from x to context.

    Args:
      x: [B, T, D] queries' inputs.
      segment_ids: [B, T] segment ids of x (0 = padding), or None.
      context: [B, S, D] keys' and values' inputs (cross-attention), or None for self-attention.
      context_segment_ids: [B, S] segment ids of context, or None.
    Returns:
      [B, T, D].
    """
    if context is None:
      context, context_segment_ids = x, segment_ids
    mask = Mask(causal=self.causal, q_segment_ids=segment_ids, kv_segment_ids=context_segment_ids)
    out = self.attend(self.q(x), self.k(context), self.v(context), mask=mask)
    return self.o(out)
