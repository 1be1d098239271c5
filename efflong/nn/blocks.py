"""Transformer blocks (pre-LN or post-LN) and the layer stack shared by every model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import ml_collections
from flax import nnx

from efflong import errors
from efflong.nn import reversible
from efflong.nn.attention import Attention
from efflong.nn.feedforward import FeedForward
from efflong.nn.layers import dropout, layer_norm
from efflong.params import Dtype

LayerCache = dict  # a layer's decoding cache: {'self': family cache, 'cross'?: {k, v, segment_ids}}

# The block's input [B, T, D], named (jax.ad_checkpoint.checkpoint_name) inside the checkpointed
# block: under remat the one per-block residual the backward recomputes the block from.
BLOCK_IN = 'block_in'

# model.remat -> the jax.checkpoint policy each block runs under (None: no checkpoint): what the
# forward pass keeps for the backward; everything else is recomputed from the block's input.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    # Matmul outputs without batch dimensions (the projections and the feed-forward), not the
    # attention scores [B, N, T, S] (their dot_general has batch dimensions B, N).
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # 'full' with the block's input copied to host memory in the forward and back for the
    # backward: no per-block activation stays on the device (it saves device memory where the
    # backend has a separate host memory: GPU, TPU).
    'offload': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_IN],
        offload_src='device', offload_dst='pinned_host'),
}


class Block(nnx.Module):
  """Self-attention, optional cross-attention, feed-forward; each in a residual branch.

  pre-LN:  x = x + drop(f(norm(x)))      post-LN:  x = norm(x + drop(f(x)))
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, causal: bool, cross: bool,
               attention_kw: dict, max_len: int | None = None, stack_modules: dict | None = None,
               dtype: Dtype, rngs: nnx.Rngs):
    d = cfg.d_model
    head_dim = cfg.head_dim or d // cfg.num_heads
    if not cfg.head_dim and d % cfg.num_heads:
      raise errors.Error(f'model.d_model={d} is not divisible by model.num_heads={cfg.num_heads} '
                         '(or set model.head_dim).')
    self.pre_ln = cfg.norm == 'pre'
    self.dropout_rate = cfg.dropout_rate
    attn = dict(d_model=d, num_heads=cfg.num_heads, head_dim=head_dim,
                num_kv_heads=cfg.num_kv_heads, impl=cfg.attention_impl, dtype=dtype, rngs=rngs)
    self.self_attn = Attention(family=cfg.attention, family_kw=attention_kw, causal=causal,
                               max_len=max_len, stack_modules=stack_modules, **attn)
    self.self_norm = layer_norm(d, dtype=dtype, rngs=rngs)
    # Cross-attention reads a full encoder output: dense, bidirectional.
    self.cross_attn = Attention(family='dense', causal=False, **attn) if cross else None
    self.cross_norm = layer_norm(d, dtype=dtype, rngs=rngs) if cross else None
    self.ff = FeedForward(d, cfg.d_ff, activation=cfg.activation, dropout_rate=cfg.dropout_rate,
                          dtype=dtype, rngs=rngs, chunk_size=cfg.ff_chunk_size)
    self.ff_norm = layer_norm(d, dtype=dtype, rngs=rngs)

  def _branch(self, x: jax.Array, norm: nnx.LayerNorm, f, key: jax.Array | None) -> jax.Array:
    """The pre-LN residual branch: drop(f(norm(x)))."""
    return dropout(f(norm(x)), self.dropout_rate, key)

  def _residual(self, x: jax.Array, norm: nnx.LayerNorm, f, key: jax.Array | None) -> jax.Array:
    if self.pre_ln:
      return x + self._branch(x, norm, f, key)
    return norm(x + dropout(f(x), self.dropout_rate, key))

  def _attentions(self, segment_ids, global_tokens, context, context_segment_ids, memory=None,
                  memory_segment_ids=None):
    """The self- and cross-attention functions of h [B, T, D] (cross: None without a context).
    memory: the layer's input at the M positions before x [B, M, D] (normed here like x), or None."""
    if memory is not None and self.pre_ln:
      memory = self.self_norm(memory)
    self_fn = lambda h: self.self_attn(h, segment_ids=segment_ids, global_tokens=global_tokens,
                                       memory=memory, memory_segment_ids=memory_segment_ids)
    cross_fn = None if self.cross_attn is None else (
        lambda h: self.cross_attn(h, segment_ids=segment_ids, context=context,
                                  context_segment_ids=context_segment_ids))
    return self_fn, cross_fn

  def _forward(self, x: jax.Array, self_fn, cross_fn, keys: list) -> jax.Array:
    """The block on x [B, T, D] with the given attention functions (see _attentions)."""
    x = self._residual(x, self.self_norm, self_fn, keys[0])
    if cross_fn is not None:
      x = self._residual(x, self.cross_norm, cross_fn, keys[1])
    return self._residual(x, self.ff_norm, lambda h: self.ff(h, key=keys[3]), keys[2])

  def _attention_delta(self, x: jax.Array, self_fn, cross_fn, keys: list) -> jax.Array:
    """F of a reversible layer with the given attention functions."""
    delta = self._branch(x, self.self_norm, self_fn, keys[0])
    if cross_fn is not None:
      delta = delta + self._branch(x + delta, self.cross_norm, cross_fn, keys[1])
    return delta

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None, key: jax.Array | None,
               global_tokens: jax.Array | None = None, context: jax.Array | None = None,
               context_segment_ids: jax.Array | None = None, memory: jax.Array | None = None,
               memory_segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, D] -> [B, T, D]. context: [B, S, D] encoder output for cross-attention.

    global_tokens: [B, T] bool tokens with full self-attention (longformer, bigbird), or None.
    memory: [B, M, D] this layer's inputs at the M positions before x, with memory_segment_ids
      [B, M] (Transformer-XL), or None.
    """
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    self_fn, cross_fn = self._attentions(segment_ids, global_tokens, context, context_segment_ids,
                                         memory, memory_segment_ids)
    return self._forward(x, self_fn, cross_fn, keys)

  def attention_delta(self, x: jax.Array, *, key: jax.Array | None, segment_ids: jax.Array | None,
                      global_tokens: jax.Array | None = None, context: jax.Array | None = None,
                      context_segment_ids: jax.Array | None = None) -> jax.Array:
    """F of a reversible layer (pre-LN): what the attention sub-layers add to x [B, T, D]."""
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    self_fn, cross_fn = self._attentions(segment_ids, global_tokens, context, context_segment_ids)
    return self._attention_delta(x, self_fn, cross_fn, keys)

  def ff_delta(self, x: jax.Array, *, key: jax.Array | None) -> jax.Array:
    """G of a reversible layer (pre-LN): what the feed-forward sub-layer adds to x [B, T, D]."""
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    return self._branch(x, self.ff_norm, lambda h: self.ff(h, key=keys[3]), keys[2])

  def init_cache(self, batch: int, max_len: int, **layer: int | str | None) -> LayerCache:
    """{'self': the self-attention family's empty cache}; layer: mem_len, segment_len, kv_dtype
    (Attention.init_cache)."""
    return {'self': self.self_attn.init_cache(batch, max_len, **layer)}

  def context_cache(self, cache: LayerCache, context: jax.Array,
                    context_segment_ids: jax.Array | None) -> LayerCache:
    """cache plus 'cross': the cross-attention's keys and values of context [B, S, D]."""
    return {**cache, 'cross': self.cross_attn.context_cache(context, context_segment_ids)}

  def _cached_attentions(self, cache: LayerCache, segment_ids, global_tokens):
    """(self_fn, cross_fn, new cache): attention functions that read the cache; self_fn stores
    the self-attention's updated cache in the returned dict when called."""
    new = dict(cache)

    def self_fn(h):
      out, new['self'] = self.self_attn.decode(h, cache['self'], segment_ids=segment_ids,
                                               global_tokens=global_tokens)
      return out

    cross_fn = None if self.cross_attn is None else (
        lambda h: self.cross_attn.attend_context(h, cache['cross'], segment_ids=segment_ids))
    return self_fn, cross_fn, new

  def decode(self, x: jax.Array, cache: LayerCache, *, segment_ids: jax.Array | None,
             global_tokens: jax.Array | None = None,
             reversible_delta: bool = False) -> tuple[jax.Array, LayerCache]:
    """The block on new positions x [B, T, D] through its cache (no dropout).

    segment_ids: [B, T] 1 on real new positions, 0 on right-padding, or None (all real).
    reversible_delta: return F (attention_delta) rather than the block's output.
    Returns the output (or F) [B, T, D] and the updated cache.
    """
    self_fn, cross_fn, new = self._cached_attentions(cache, segment_ids, global_tokens)
    run = self._attention_delta if reversible_delta else self._forward
    return run(x, self_fn, cross_fn, [None] * 4), new


class Stack(nnx.Module):
  """num_layers blocks, with a final norm for pre-LN stacks; max_len: the longest input.

  model.remat runs each block under jax.checkpoint with REMAT_POLICIES[remat] (training memory:
  activations kept per block instead of every intermediate; decoding is not affected).
  """

  NORMS = ('pre', 'post')

  def __init__(self, cfg: ml_collections.ConfigDict, *, causal: bool, cross: bool = False,
               max_len: int | None = None, attention_kw: dict, dtype: Dtype, rngs: nnx.Rngs):
    if cfg.norm not in self.NORMS:
      raise errors.Error(f'unknown model.norm {cfg.norm!r}; valid: {list(self.NORMS)}.')
    if cfg.reversible and cfg.norm != 'pre':
      raise errors.Error("model.reversible needs model.norm='pre' (a post-LN layer cannot be "
                         'inverted from its output).')
    if cfg.remat not in REMAT_POLICIES:
      raise errors.Error(f'unknown model.remat {cfg.remat!r}; valid: {list(REMAT_POLICIES)}.')
    if cfg.reversible and cfg.remat != 'none':
      raise errors.Error(f"model.remat={cfg.remat!r} needs model.reversible=False (the reversible "
                         "stack already recomputes each layer in the backward; use remat='none').")
    self.reversible = cfg.reversible
    self.remat = cfg.remat
    stack_modules = {}  # Family modules shared by all layers (e.g. Linformer's layerwise E).
    self.layers = nnx.List([Block(cfg, causal=causal, cross=cross, attention_kw=attention_kw,
                                  max_len=max_len, stack_modules=stack_modules, dtype=dtype,
                                  rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layer_norm(cfg.d_model, dtype=dtype, rngs=rngs) if cfg.norm == 'pre' else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None, key: jax.Array | None,
               global_tokens: jax.Array | None = None, context: jax.Array | None = None,
               context_segment_ids: jax.Array | None = None, memory: jax.Array | None = None,
               memory_segment_ids: jax.Array | None = None) -> jax.Array | tuple[jax.Array, ...]:
    """[B, T, D] -> [B, T, D]; the arguments as in Block.

    Reversible: both streams start as x, and the stack returns the mean of their outputs.
    memory: [L, B, M, D] each layer's inputs at the M positions before x, with
      memory_segment_ids [B, M]; then the stack returns (output, each layer's input [L, B, T, D]).
    """
    if self.reversible:
      if memory is not None:
        raise errors.Error('a segment memory (model.mem_len > 0) needs model.reversible=False.')
      graphdef, params, rest = nnx.split(self, nnx.Param, ...)
      run = reversible.make(graphdef, len(self.layers))
      y1, y2 = run(params, rest, x, x, context,
                   (segment_ids, global_tokens, context_segment_ids, key))
      x = (y1 + y2) / 2
      return x if self.final_norm is None else self.final_norm(x)
    inputs = []
    call = lambda layer, x, kw: layer(x, **kw)
    if REMAT_POLICIES[self.remat] is not None:
      call = nnx.remat(lambda layer, x, kw: layer(checkpoint_name(x, BLOCK_IN), **kw),
                       policy=REMAT_POLICIES[self.remat])
    for i, layer in enumerate(self.layers):
      inputs.append(x)
      layer_key = None if key is None else jax.random.fold_in(key, i)
      x = call(layer, x, dict(segment_ids=segment_ids, key=layer_key, global_tokens=global_tokens,
                              context=context, context_segment_ids=context_segment_ids,
                              memory=None if memory is None else memory[i],
                              memory_segment_ids=memory_segment_ids))
    x = x if self.final_norm is None else self.final_norm(x)
    return x if memory is None else (x, jnp.stack(inputs))

  def init_cache(self, batch: int, max_len: int, **layer: int | str | None) -> list[LayerCache]:
    """Each layer's empty decoding cache (Block.init_cache); layer: mem_len, segment_len,
    kv_dtype."""
    return [layer_.init_cache(batch, max_len, **layer) for layer_ in self.layers]

  def context_cache(self, caches: list[LayerCache], context: jax.Array,
                    context_segment_ids: jax.Array | None) -> list[LayerCache]:
    """caches with each layer's cross-attention keys and values of context [B, S, D]."""
    return [layer.context_cache(c, context, context_segment_ids)
            for layer, c in zip(self.layers, caches)]

  def decode(self, x: jax.Array, caches: list[LayerCache], *, segment_ids: jax.Array | None,
             global_tokens: jax.Array | None = None) -> tuple[jax.Array, list[LayerCache]]:
    """The stack on new positions x [B, T, D] through each layer's cache -> ([B, T, D], caches).

    segment_ids: [B, T] 1 on real new positions, 0 on right-padding, or None. A reversible
    stack runs its two streams forward as reversible.forward does (decoding needs no inverse).
    """
    new = []
    kw = dict(segment_ids=segment_ids, global_tokens=global_tokens)
    if self.reversible:
      x1 = x2 = x
      for layer, cache in zip(self.layers, caches):
        delta, cache = layer.decode(x2, cache, reversible_delta=True, **kw)
        x1 = x1 + delta
        x2 = x2 + layer.ff_delta(x1, key=None)
        new.append(cache)
      x = (x1 + x2) / 2
    else:
      for layer, cache in zip(self.layers, caches):
        x, cache = layer.decode(x, cache, **kw)
        new.append(cache)
    return (x if self.final_norm is None else self.final_norm(x)), new
