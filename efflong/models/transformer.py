"""Encoder, decoder-only LM and encoder-decoder over one block stack (classifiers: classifier.py).

Every model is called as `model(batch, key=...)` on a dict of [B, T] arrays and returns logits.
Batch fields read (absent optional fields mean: one segment, positions 0..T-1):
  lm, encoder:     inputs, segment_ids?, positions?, global_tokens?              -> [B, T, V]
  encoder_decoder: inputs, segment_ids?, positions?, global_tokens?, decoder_inputs,
                   decoder_segment_ids?, decoder_positions?                      -> [B, T_dec, V]
Segment id 0 marks padding. `global_tokens` ([B, T] bool, on `inputs`) flags tokens with full
self-attention for the families that have them (longformer, bigbird); others refuse it. Packed rows need `positions` restarting at each segment (the task
supplies them).

Cached decoding (kinds 'lm' and 'encoder_decoder', a family in attention.names(decode=True)):
  cache = model.init_cache(batch_size, max_len, kv_dtype='float'|'int8')
  logits [B, T, V], cache = model.prefill(batch, cache)      # the prompt, right-padded
  logits [B, V], cache = model.decode_step(tokens [B], cache)  # one position per row
Both run through `model(batch, cache=cache)` -> (logits, cache): a quantized model (qwix
intercepts one method of an NNX model, `__call__`) then decodes quantized as well.
The cache is {'length': [B] int32, 'max_len': [B] int32, 'layers': [each layer's cache]}; every
leaf has the batch on axis 0 (rows can be reordered or repeated, e.g. for beam search). One
sequence per row: segment ids mark real (1) and padding (0) positions, positions are absolute from
cache['length']. A call that takes a row past max_len is an error (errors.check: logged when the
program runs, raised by errors.raise_pending).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from efflong import errors
from efflong.nn.blocks import Stack
from efflong.nn.layers import dense, dropout
from efflong.nn.positions import Positions
from efflong.params import Dtype, partitioned

Batch = dict[str, jax.Array]
Memory = dict[str, jax.Array]  # Transformer-XL's segment memory: see init_memory
Cache = dict[str, Any]  # a decoding cache: {'length', 'max_len': [B] int32, 'layers': [dicts]}


def _positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def init_memory(cfg: ml_collections.ConfigDict, batch_size: int, mem_len: int) -> Memory:
  """An empty segment memory for model config cfg: hidden [L, B, M, D] zeros in the compute
  dtype, segment_ids [B, M] zeros (nothing to see yet)."""
  return {'hidden': jnp.zeros((cfg.num_layers, batch_size, mem_len, cfg.d_model),
                              jnp.dtype(cfg.dtype)),
          'segment_ids': jnp.zeros((batch_size, mem_len), jnp.int32)}


class Embedder(nnx.Module):
  """Token embedding plus absolute positions in, logits out (tied or untied)."""

  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, max_len: int, *,
               dtype: Dtype, rngs: nnx.Rngs, logits: bool = True):
    self.d_model, self.dropout_rate = cfg.d_model, cfg.dropout_rate
    self.embed = nnx.Embed(vocab_size, cfg.d_model, dtype=dtype, rngs=rngs,
                           embedding_init=partitioned(nnx.initializers.normal(1.0), 'vocab', 'embed'))
    self.positions = Positions(cfg.positions, max_len, cfg.d_model, rngs=rngs)
    # logits=False (a classifier): no vocabulary head to carry as dead parameters.
    self.head = None if cfg.tie_embeddings or not logits else dense(cfg.d_model, vocab_size, ('embed', 'vocab'),
                                                      dtype=dtype, rngs=rngs)

  def check_length(self, max_len: int) -> None:
    """Raises errors.Error if positions up to max_len have no encoding (a learned table's end)."""
    table = self.positions.learned
    if table is not None and max_len > table.max_len:
      raise errors.Error(f'decoding max_len={max_len} exceeds the learned position table '
                         f'({table.max_len} = task.seq_len).')

  def encode(self, tokens: jax.Array, positions: jax.Array | None,
             key: jax.Array | None) -> jax.Array:
    """[B, T] tokens -> [B, T, D]."""
    x = self.embed(tokens) + self.positions(_positions(tokens, positions))
    return dropout(x.astype(self.embed.dtype or x.dtype), self.dropout_rate, key)

  def decode(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, V] float32 logits."""
    if self.head is None:
      table = self.embed.embedding[...].astype(x.dtype)
      logits = jnp.einsum('BTD,VD->BTV', x, table, preferred_element_type=jnp.float32)
      logits = logits * self.d_model ** -0.5
    else:
      logits = self.head(x)
    return logits.astype(jnp.float32)


def _decode_stack(embedder: Embedder, stack: Stack, tokens: jax.Array,
                  segment_ids: jax.Array | None, cache: Cache,
                  global_tokens: jax.Array | None = None) -> tuple[jax.Array, Cache]:
  """New positions tokens [B, T] (segment_ids [B, T]: 1 real, 0 right-padding; None: all real)
  through a causal stack's cache -> (logits [B, T, V], cache); positions continue cache['length']."""
  length = cache['length']
  positions = length[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
  x = embedder.encode(tokens, positions, None)
  x, layers = stack.decode(x, cache['layers'], segment_ids=segment_ids,
                           global_tokens=global_tokens)
  real = tokens.shape[1] if segment_ids is None else (segment_ids != 0).sum(1, dtype=jnp.int32)
  longest, max_len = (length + real).max(), cache['max_len'].max()
  # The host check runs only when a row overflows: no host round-trip per decoded token.
  errors.check(lambda n, m: None if n <= m else (
      f'decoding past the cache: a row reached {n} positions, the cache holds max_len={m} '
      '(init_cache); its later positions were not cached.'), longest, max_len,
               failed=longest > max_len)
  return embedder.decode(x), {**cache, 'length': length + real, 'layers': layers}


def _empty_cache(batch_size: int, max_len: int, layers: list) -> Cache:
  """The model-level cache: length [B] (positions cached per row), max_len [B] (what the
  layers' caches hold; a leaf so every leaf is batch-first) and the layers' caches."""
  return {'length': jnp.zeros((batch_size,), jnp.int32),
          'max_len': jnp.full((batch_size,), max_len, jnp.int32), 'layers': layers}


class LanguageModel(nnx.Module):
  """Decoder-only, causal (kind 'lm'); with causal=False it is a token-level encoder ('encoder')."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, vocab_size: int, max_len: int,
               attention_kw: dict, causal: bool = True, rngs: nnx.Rngs, **unused_task):
    dtype = jnp.dtype(cfg.dtype)
    self.max_len, self.mem_len = max_len, cfg.mem_len
    self.embedder = Embedder(cfg, vocab_size, max_len, dtype=dtype, rngs=rngs)
    self.stack = Stack(cfg, causal=causal, max_len=max_len, attention_kw=attention_kw, dtype=dtype,
                       rngs=rngs)

  def __call__(self, batch: Batch, *, key: jax.Array | None = None, memory: Memory | None = None,
               cache: Cache | None = None) -> jax.Array | tuple[jax.Array, Memory | Cache]:
    """[B, T, V] logits; with a memory (Transformer-XL), (logits, the next segment's memory);
    with a cache, cached decoding (prefill's arguments and result; no key, no memory).

    The memory holds each layer's input at the M positions before this segment (`init_memory`
    makes an empty one); rows whose batch['reset'] is True start afresh (their memory is emptied).
    The next memory is the last M positions of [memory; this segment], without gradient.
    """
    if cache is not None:
      if key is not None or memory is not None:
        raise errors.Error('cached decoding takes no dropout key and no segment memory (the '
                           "family's cache holds its memory).")
      return _decode_stack(self.embedder, self.stack, batch['inputs'], batch.get('segment_ids'),
                           cache, batch.get('global_tokens'))
    keys = [None, None] if key is None else list(jax.random.split(key))
    x = self.embedder.encode(batch['inputs'], batch.get('positions'), keys[0])
    if memory is None:
      x = self.stack(x, segment_ids=batch.get('segment_ids'), key=keys[1],
                     global_tokens=batch.get('global_tokens'))
      return self.embedder.decode(x)
    mem_seg = memory['segment_ids']
    if 'reset' in batch:
      mem_seg = jnp.where(jnp.reshape(batch['reset'], (-1, 1)), 0, mem_seg)
    seg = batch.get('segment_ids')
    seg = jnp.ones(x.shape[:2], jnp.int32) if seg is None else seg
    x, inputs = self.stack(x, segment_ids=seg, key=keys[1], memory=memory['hidden'],
                           memory_segment_ids=mem_seg)
    m = mem_seg.shape[1]
    last = lambda a, axis: jax.lax.slice_in_dim(a, a.shape[axis] - m, a.shape[axis], axis=axis)
    new = {'hidden': jax.lax.stop_gradient(last(jnp.concatenate([memory['hidden'], inputs], 2), 2)),
           'segment_ids': last(jnp.concatenate([mem_seg, seg], 1), 1)}
    return self.embedder.decode(x), new

  def init_cache(self, batch_size: int, max_len: int, *, mem_len: int | None = None,
                 kv_dtype: str = 'float') -> Cache:
    """An empty decoding cache for batch_size rows of up to max_len positions (prompt included).

    mem_len: Transformer-XL's segment memory (None: model.mem_len); the family sees it with the
    training segment length (task.seq_len) if its init_cache declares them.
    kv_dtype: 'float' or 'int8' (keys and values int8 with per-token scales, efflong.nn.kv_cache).

    Raises:
      errors.Error: the model is bidirectional, its attention family cannot decode, or it cannot
        keep the kv_dtype asked for.
    """
    self.embedder.check_length(max_len)
    mem_len = self.mem_len if mem_len is None else mem_len
    layers = self.stack.init_cache(batch_size, max_len, mem_len=mem_len, segment_len=self.max_len,
                                   kv_dtype=kv_dtype)
    return _empty_cache(batch_size, max_len, layers)

  def prefill(self, batch: Batch, cache: Cache) -> tuple[jax.Array, Cache]:
    """Runs the prompts through the model and caches them.

    Args:
      batch: inputs [B, T] right-padded prompts; segment_ids [B, T] 1 on real tokens, 0 on
        padding (absent: all real); global_tokens [B, T] bool (longformer, bigbird), optional.
      cache: from init_cache (or a previous call: the prompts then continue each row).
    Returns:
      logits [B, T, V] float32 (meaningless at padding) and the cache.
    """
    return self(batch, cache=cache)

  def decode_step(self, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """One new token per row: tokens [B] int32 -> (logits [B, V] float32, cache)."""
    logits, cache = self({'inputs': tokens[:, None]}, cache=cache)
    return logits[:, 0], cache


class Encoder(LanguageModel):
  """Bidirectional token-level encoder (kind 'encoder'): per-token logits."""

  def __init__(self, cfg: ml_collections.ConfigDict, **kw):
    super().__init__(cfg, causal=False, **kw)


class EncoderDecoder(nnx.Module):
  """Bidirectional encoder, causal decoder with cross-attention; shared embeddings."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, vocab_size: int, max_len: int,
               attention_kw: dict, rngs: nnx.Rngs, **unused_task):
    dtype = jnp.dtype(cfg.dtype)
    self.embedder = Embedder(cfg, vocab_size, max_len, dtype=dtype, rngs=rngs)
    self.encoder = Stack(cfg, causal=False, max_len=max_len, attention_kw=attention_kw,
                         dtype=dtype, rngs=rngs)
    self.decoder = Stack(cfg, causal=True, cross=True, max_len=max_len,
                         attention_kw=attention_kw, dtype=dtype,
                         rngs=rngs)

  def __call__(self, batch: Batch, *, key: jax.Array | None = None,
               cache: Cache | None = None) -> jax.Array | tuple[jax.Array, Cache]:
    """[B, T_dec, V] logits; with a cache, cached decoding -> (logits, cache): a batch with the
    source 'inputs' is prefill's (the source encoded and cached), one without continues the
    decoder_inputs (decode_step's). No key with a cache."""
    if cache is not None:
      if key is not None:
        raise errors.Error('cached decoding takes no dropout key.')
      if 'inputs' in batch:
        enc = self.encoder(self.embedder.encode(batch['inputs'], batch.get('positions'), None),
                           segment_ids=batch.get('segment_ids'), key=None,
                           global_tokens=batch.get('global_tokens'))
        cache = {**cache, 'layers': self.decoder.context_cache(cache['layers'], enc,
                                                               batch.get('segment_ids'))}
      return _decode_stack(self.embedder, self.decoder, batch['decoder_inputs'],
                           batch.get('decoder_segment_ids'), cache)
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    enc_seg = batch.get('segment_ids')
    enc = self.encoder(self.embedder.encode(batch['inputs'], batch.get('positions'), keys[0]),
                       segment_ids=enc_seg, key=keys[1], global_tokens=batch.get('global_tokens'))
    dec_seg = batch.get('decoder_segment_ids')
    if (enc_seg is None) != (dec_seg is None):
      raise errors.Error('encoder_decoder needs both segment_ids and decoder_segment_ids, or '
                         'neither.')
    x = self.embedder.encode(batch['decoder_inputs'], batch.get('decoder_positions'), keys[2])
    x = self.decoder(x, segment_ids=dec_seg, key=keys[3], context=enc, context_segment_ids=enc_seg)
    return self.embedder.decode(x)

  def init_cache(self, batch_size: int, max_len: int, *, kv_dtype: str = 'float') -> Cache:
    """An empty decoder cache for batch_size rows of up to max_len target positions; prefill adds
    each decoder layer's cross-attention keys and values ('cross', kept float). kv_dtype: the
    decoder self-attention's cache, as in LanguageModel.init_cache."""
    self.embedder.check_length(max_len)
    return _empty_cache(batch_size, max_len,
                        self.decoder.init_cache(batch_size, max_len, kv_dtype=kv_dtype))

  def prefill(self, batch: Batch, cache: Cache) -> tuple[jax.Array, Cache]:
    """Encodes the source once and runs the target prompts through the decoder.

    Args:
      batch: inputs [B, S] source, segment_ids [B, S] (1 real, 0 padding; absent: all real),
        positions?, global_tokens?; decoder_inputs [B, T] right-padded target prompts (at least
        the start token), decoder_segment_ids [B, T] (1 real, 0 padding; absent: all real).
      cache: from init_cache.
    Returns:
      logits [B, T, V] float32 and the cache, with each layer's cross-attention keys and values
      of the encoder output ('cross': k, v [B, S, K, H], segment_ids [B, S]).
    """
    return self(batch, cache=cache)

  def decode_step(self, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """One new target token per row: tokens [B] int32 -> (logits [B, V] float32, cache)."""
    logits, cache = self({'decoder_inputs': tokens[:, None]}, cache=cache)
    return logits[:, 0], cache

