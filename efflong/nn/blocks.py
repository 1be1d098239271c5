"""Transformer blocks (pre-LN or post-LN) and the layer stack shared by every model."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from efflong.nn.attention import Attention
from efflong.nn.feedforward import FeedForward
from efflong.nn.layers import Dtype, dropout, layer_norm


class Block(nnx.Module):
  """Self-attention, optional cross-attention, feed-forward; each in a residual branch.

  pre-LN:  x = x + drop(f(norm(x)))      post-LN:  x = norm(x + drop(f(x)))
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, causal: bool, cross: bool,
               attention_kw: dict, max_len: int | None = None, stack_modules: dict | None = None,
               dtype: Dtype, rngs: nnx.Rngs):
    d = cfg.d_model
    if d % cfg.num_heads:
      raise ValueError(f'model.d_model={d} is not divisible by model.num_heads={cfg.num_heads}.')
    self.pre_ln = cfg.norm == 'pre'
    self.dropout_rate = cfg.dropout_rate
    attn = dict(d_model=d, num_heads=cfg.num_heads, head_dim=d // cfg.num_heads,
                num_kv_heads=cfg.num_kv_heads, dtype=dtype, rngs=rngs)
    self.self_attn = Attention(family=cfg.attention, family_kw=attention_kw, causal=causal,
                               max_len=max_len, stack_modules=stack_modules, **attn)
    self.self_norm = layer_norm(d, dtype=dtype, rngs=rngs)
    # Cross-attention reads a full encoder output: dense, bidirectional.
    self.cross_attn = Attention(family='dense', causal=False, **attn) if cross else None
    self.cross_norm = layer_norm(d, dtype=dtype, rngs=rngs) if cross else None
    self.ff = FeedForward(d, cfg.d_ff, activation=cfg.activation, dropout_rate=cfg.dropout_rate,
                          dtype=dtype, rngs=rngs)
    self.ff_norm = layer_norm(d, dtype=dtype, rngs=rngs)

  def _residual(self, x: jax.Array, norm: nnx.LayerNorm, f, key: jax.Array | None) -> jax.Array:
    if self.pre_ln:
      return x + dropout(f(norm(x)), self.dropout_rate, key)
    return norm(x + dropout(f(x), self.dropout_rate, key))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None, key: jax.Array | None,
               global_tokens: jax.Array | None = None, context: jax.Array | None = None,
               context_segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, D] -> [B, T, D]. context: [B, S, D] encoder output for cross-attention.

    global_tokens: [B, T] bool tokens with full self-attention (longformer, bigbird), or None.
    """
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    x = self._residual(
        x, self.self_norm,
        lambda h: self.self_attn(h, segment_ids=segment_ids, global_tokens=global_tokens), keys[0])
    if self.cross_attn is not None:
      x = self._residual(
          x, self.cross_norm,
          lambda h: self.cross_attn(h, segment_ids=segment_ids, context=context,
                                    context_segment_ids=context_segment_ids), keys[1])
    return self._residual(x, self.ff_norm, lambda h: self.ff(h, key=keys[3]), keys[2])


class Stack(nnx.Module):
  """num_layers blocks, with a final norm for pre-LN stacks; max_len: the longest input."""

  NORMS = ('pre', 'post')

  def __init__(self, cfg: ml_collections.ConfigDict, *, causal: bool, cross: bool = False,
               max_len: int | None = None, attention_kw: dict, dtype: Dtype, rngs: nnx.Rngs):
    if cfg.norm not in self.NORMS:
      raise ValueError(f'unknown model.norm {cfg.norm!r}; valid: {list(self.NORMS)}.')
    stack_modules = {}  # Family modules shared by all layers (e.g. Linformer's layerwise E).
    self.layers = nnx.List([Block(cfg, causal=causal, cross=cross, attention_kw=attention_kw,
                                  max_len=max_len, stack_modules=stack_modules, dtype=dtype,
                                  rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layer_norm(cfg.d_model, dtype=dtype, rngs=rngs) if cfg.norm == 'pre' else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None, key: jax.Array | None,
               global_tokens: jax.Array | None = None, context: jax.Array | None = None,
               context_segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, D] -> [B, T, D]; the arguments as in Block."""
    for i, layer in enumerate(self.layers):
      layer_key = None if key is None else jax.random.fold_in(key, i)
      x = layer(x, segment_ids=segment_ids, key=layer_key, global_tokens=global_tokens,
                context=context,
                context_segment_ids=context_segment_ids)
    return x if self.final_norm is None else self.final_norm(x)
