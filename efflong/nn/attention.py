"""The multi-head attention layer: projections around a registered attention family."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx
from jax.sharding import PartitionSpec as P

from efflong import attention, errors
from efflong.attention import Mask
from efflong.nn import kv_cache
from efflong.params import Dtype, head_projection, partitioned


def length_axes() -> tuple[str, ...]:
  """The mesh axes of size > 1 that the current logical rules give 'length' (context parallelism),
  as a step traced under `efflong.train.sharding.traced_under` sees them; () outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = linen.logical_to_mesh_axes(('length',))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


class Attention(nnx.Module):
  """Projections q, k, v, o around `attention.get(family).attend`.

  The family, its hyper-parameters and impl (`Family.bind`: 'xla' | 'pallas' | 'auto') are
  static: a model for other hyper-parameters (an eval-time override) is a second graph over the
  same parameters. max_len (the longest input) and stack_modules (a dict shared by the layers of
  a stack) reach only the family's module factory.

  Decoding (a causal layer of a family that decodes): `init_cache` makes the family's cache and
  `decode` attends new positions through it. A cross-attention layer decodes by computing its
  keys and values once (`context_cache`) and reading them at every step (`attend_context`).
  An int8 cache (`init_cache(kv_dtype='int8')`, efflong.nn.kv_cache) holds the family's keys and
  values as int8 with per-token scales; `decode` dequantizes it around the family's step.
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
               family: str = 'dense', family_kw: dict[str, Any] | None = None, causal: bool,
               impl: str = 'xla', max_len: int | None = None, stack_modules: dict | None = None,
               dtype: Dtype, rngs: nnx.Rngs):
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise errors.Error(f'model.num_kv_heads={num_kv_heads} must divide num_heads={num_heads}.')
    self.causal = causal
    fam = attention.get(family)
    self.attend = fam.bind(causal=causal, impl=impl, **(family_kw or {}))
    layer = dict(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 head_dim=head_dim, max_len=max_len, stack_modules=stack_modules, dtype=dtype,
                 rngs=rngs)
    self.family_module = fam.make_module(family_kw or {}, **layer)
    can_decode = causal and fam.decode
    self.step = fam.bind_step(impl=impl, **(family_kw or {})) if can_decode else None
    self.context_attend = (fam.bind_context(causal=causal, impl=impl, **(family_kw or {}))
                           if fam.context_parallel else None)
    self.make_cache = (functools.partial(fam.make_cache, num_kv_heads=num_kv_heads,
                                         head_dim=head_dim, dtype=dtype, **(family_kw or {}))
                       if can_decode else None)
    self.family, self.takes_memory = family, fam.memory
    self.q = head_projection(d_model, num_heads, head_dim, dtype=dtype, rngs=rngs)
    if fam.shared_qk and num_kv_heads != num_heads:
      raise errors.Error(f'attention {family!r} shares queries and keys: model.num_kv_heads='
                         f'{num_kv_heads} must equal num_heads={num_heads} (or 0).')
    self.k = (None if fam.shared_qk
              else head_projection(d_model, num_kv_heads, head_dim, dtype=dtype, rngs=rngs))
    self.v = head_projection(d_model, num_kv_heads, head_dim, dtype=dtype, rngs=rngs)
    self.o = nnx.Einsum('BTNH,NHD->BTD', (num_heads, head_dim, d_model), dtype=dtype, rngs=rngs,
                        kernel_init=partitioned(nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                                                'heads', 'head_dim', 'embed'))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None,
               global_tokens: jax.Array | None = None, context: jax.Array | None = None,
               context_segment_ids: jax.Array | None = None, memory: jax.Array | None = None,
               memory_segment_ids: jax.Array | None = None) -> jax.Array:
    """Self-attention over x (after a memory, if given), or cross-attention from x to context.

    Args:
      x: [B, T, D] queries' inputs.
      segment_ids: [B, T] segment ids of x (0 = padding), or None.
      global_tokens: [B, T] bool tokens with full attention (self-attention only), or None.
      context: [B, S, D] keys' and values' inputs (cross-attention), or None for self-attention.
      context_segment_ids: [B, S] segment ids of context, or None.
      memory: [B, M, D] inputs of the M positions before x (Transformer-XL's segment memory): the
        keys and values are over [memory; x], queries aligned at the end. None: no memory.
      memory_segment_ids: [B, M] their segment ids (0: not filled yet); required with memory.
    Returns:
      [B, T, D].
    """
    if memory is not None:
      if not self.takes_memory:
        raise errors.Error(f'attention {self.family!r} cannot read a segment memory; families that '
                           f'can: {attention.names(memory=True)}.')
      if context is not None or global_tokens is not None:
        raise errors.Error('a segment memory applies to plain self-attention (no context, no '
                           'global tokens).')
      if segment_ids is None:
        segment_ids = jnp.ones(x.shape[:2], jnp.int32)
      context = jnp.concatenate([memory.astype(x.dtype), x], axis=1)
      context_segment_ids = jnp.concatenate([memory_segment_ids, segment_ids], axis=1)
    elif context is None:
      context, context_segment_ids = x, segment_ids
    elif global_tokens is not None:
      raise errors.Error('global_tokens apply to self-attention, not cross-attention.')
    elif self.k is None:
      raise errors.Error('shared-QK attention (lsh) is self-attention; it cannot read a context.')
    mask = Mask(causal=self.causal, q_segment_ids=segment_ids, kv_segment_ids=context_segment_ids,
                global_tokens=global_tokens)
    inputs = {} if self.family_module is None else self.family_module(x)
    q = self.q(x)
    k = q if self.k is None else self.k(context)
    out = self._attend(q, k, self.v(context), mask, inputs, self_attention=context is x)
    return self.o(out)

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, inputs: dict[str, Any],
              *, self_attention: bool) -> jax.Array:
    """The family's attend, or, when the current rules split the length over mesh axes of
    size > 1 (context parallelism, `length_axes`), its context twin under jax.shard_map: q, k, v,
    the mask's arrays and the [B, T, ...] inputs split over the length, the other mesh axes left
    automatic. Cross-attention and a memory (keys of another length) run the plain attend on the
    split arrays (the compiler gathers the keys)."""
    axes = length_axes()
    if not axes:
      return self.attend(q, k, v, mask=mask, **inputs)
    if self.context_attend is None:
      attention.get(self.family).check_context()
    if not self_attention:
      return self.attend(q, k, v, mask=mask, **inputs)
    mesh = jax.sharding.get_abstract_mesh()
    size = math.prod(mesh.shape[a] for a in axes)
    if q.shape[1] % size:
      raise errors.Error(f'context parallelism splits the length T={q.shape[1]} over mesh axes '
                         f'{axes} of {size} devices; T must be a multiple of {size}.')
    axis_name = axes[0] if len(axes) == 1 else axes
    split = P(None, axis_name)
    spec = lambda x: split if x.shape[:2] == q.shape[:2] else P()
    # The inputs' arrays enter the shard_map; the rest (e.g. a layer index) stays static.
    leaves, tree = jax.tree.flatten(inputs)
    arrays = [x for x in leaves if isinstance(x, jax.Array)]

    def twin(q, k, v, mask, arrays):
      given = iter(arrays)
      inputs = jax.tree.unflatten(tree, [next(given) if isinstance(x, jax.Array) else x
                                         for x in leaves])
      return self.context_attend(q, k, v, mask=mask, axis_name=axis_name, **inputs)

    return jax.shard_map(twin, in_specs=(split, split, split, jax.tree.map(spec, mask),
                                         [spec(x) for x in arrays]),
                         out_specs=split, axis_names=set(axes))(q, k, v, mask, arrays)

  def init_cache(self, batch: int, max_len: int, *, mem_len: int | None = None,
                 segment_len: int | None = None, kv_dtype: str = 'float') -> dict[str, jax.Array]:
    """The family's empty cache for batch rows of up to max_len positions (`Family.make_cache`).

    mem_len, segment_len: the model's segment memory and training segment length (Transformer-XL);
    they reach the family's init_cache only if it declares them.
    kv_dtype: 'float' (the family's cache as it is) or 'int8' (its keys and values 'k', 'v'
    quantized per token: `kv_cache.quantize`).

    Raises:
      errors.Error: the layer is bidirectional or its family cannot decode (naming why), an unknown
        kv_dtype, or kv_dtype='int8' for a family whose cache holds no keys and values.
    """
    kv_cache.check_dtype(kv_dtype)
    if not self.causal:
      raise errors.Error(f'a bidirectional attention layer ({self.family!r}) cannot decode with a '
                         'cache; decoding needs a causal stack.')
    if self.make_cache is None:
      attention.get(self.family).check_decode()
    cache = self.make_cache(batch, max_len, mem_len=mem_len, segment_len=segment_len)
    if kv_dtype == 'float':
      return cache
    if not all(name in cache for name in kv_cache.KEYS):
      raise errors.Error(f"kv_dtype='int8' quantizes cached keys and values; attention "
                         f'{self.family!r} caches a running state ({sorted(cache)}) instead; '
                         f'families whose caches hold them: {kv_cache.key_value_families()}.')
    # The barrier stops XLA from constant-folding the quantization of the empty cache when it
    # compiles (seconds for a cache of 4096 positions).
    return kv_cache.quantize(jax.lax.optimization_barrier(cache))

  def decode(self, x: jax.Array, cache: dict[str, jax.Array], *, segment_ids: jax.Array | None,
             global_tokens: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal self-attention of new positions through the cache (prefill or one decoding step).

    Args:
      x: [B, T, D] inputs at the new positions, which sit at cache['length'] + 0..T-1.
      cache: from init_cache (or the previous call). An int8 cache is dequantized to float32 for
        the family's step and quantized again after it (old positions come back bit for bit).
      segment_ids: [B, T] 1 on real new positions, 0 on right-padding (not cached), or None.
      global_tokens: [B, T] bool (longformer), or None.
    Returns:
      [B, T, D] and the cache with the real new positions added.
    """
    mask = Mask.from_segments(segment_ids, causal=True, global_tokens=global_tokens)
    inputs = {} if self.family_module is None else self.family_module(x)
    q = self.q(x)
    k = q if self.k is None else self.k(x)
    int8 = kv_cache.is_quantized(cache)
    out, cache = self.step(q, k, self.v(x), kv_cache.dequantize(cache) if int8 else cache,
                           mask=mask, **inputs)
    return self.o(out), kv_cache.quantize(cache) if int8 else cache

  def context_cache(self, context: jax.Array,
                    context_segment_ids: jax.Array | None) -> dict[str, jax.Array]:
    """Cross-attention's keys and values of context [B, S, D], computed once for decoding:
    k, v [B, S, K, H] and segment_ids [B, S] (ones if None)."""
    if context_segment_ids is None:
      context_segment_ids = jnp.ones(context.shape[:2], jnp.int32)
    return {'k': self.k(context), 'v': self.v(context), 'segment_ids': context_segment_ids}

  def attend_context(self, x: jax.Array, kv: dict[str, jax.Array], *,
                     segment_ids: jax.Array | None) -> jax.Array:
    """Cross-attention from x [B, T, D] to the keys and values of context_cache; segment_ids
    [B, T] of x (None: all 1, one sequence per row). Equals __call__(x, context=...)."""
    if segment_ids is None:
      segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    mask = Mask(causal=self.causal, q_segment_ids=segment_ids, kv_segment_ids=kv['segment_ids'])
    return self.o(self.attend(self.q(x), kv['k'], kv['v'], mask=mask))
