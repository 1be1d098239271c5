"""An int8 decoding cache: keys and values stored as int8 with one scale per token and head.

Any family whose cache keeps its keys and values as cache['k'], cache['v'] [B, S, K, H] can decode
through an int8 cache: the attention layer dequantizes the cache, runs the family's attend_step and
quantizes the whole cache again. That round trip has to leave old positions unchanged, so the
quantization is idempotent: quantize(dequantize(quantize(x))) == quantize(x) bit for bit.

Symmetric absmax quantization per (row, position, kv head) (the per-token scale of LLM.int8(),
Dettmers et al. 2022, section 3.1, applied to the cached keys and values): scale = absmax / 127
rounded to bfloat16, q = clip(round(x / scale), -127, 127), x ~ q * scale. bfloat16 (8 significant
bits) moves the scale by at most 2^-9 relative, so the absmax element lands within 127 +- 0.25 and
becomes exactly +-127 (clipped at most 0.25 scale: the error stays <= scale / 2); and q * scale
(7 + 8 bits) is exact in float32. Dequantizing thus gives the vector's absmax as exactly
127 * scale, from which quantize finds the same scale and the same q again. bfloat16 also halves
the scale's bytes (H int8 values + 2 bytes per token and head).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from efflong import attention, errors

KV_DTYPES = ('float', 'int8')
KEYS = ('k', 'v')  # the cache entries an int8 cache quantizes
QMAX = 127
SCALE_DTYPE = jnp.bfloat16

Cache = dict[str, Any]


def check_dtype(kv_dtype: str) -> None:
  """Raises a one-line errors.Error unless kv_dtype is one of KV_DTYPES."""
  if kv_dtype not in KV_DTYPES:
    raise errors.Error(f'kv_dtype={kv_dtype!r}; valid: {list(KV_DTYPES)}.')


def quantize_array(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., H] float -> (q [..., H] int8 in [-127, 127], scale [..., 1] bfloat16).

  |x - q * scale| <= scale / 2 elementwise (up to the float32 rounding of x / scale); a zero vector
  gets scale 0 and q = 0.
  """
  x = x.astype(jnp.float32)
  scale = (jnp.max(jnp.abs(x), axis=-1, keepdims=True) / QMAX).astype(SCALE_DTYPE)
  scale = scale.astype(jnp.float32)
  q = jnp.round(x / jnp.where(scale > 0, scale, 1.0))
  return jnp.clip(q, -QMAX, QMAX).astype(jnp.int8), scale.astype(SCALE_DTYPE)


def dequantize_array(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """q [..., H] int8 and scale [..., 1] -> q * scale [..., H] in dtype (exact in float32)."""
  return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def is_quantized(cache: Cache) -> bool:
  """Whether cache is an int8 cache (holds the scale of its keys)."""
  return 'k_scale' in cache


def quantize(cache: Cache) -> Cache:
  """cache with 'k', 'v' [B, S, K, H] replaced by int8 and 'k_scale', 'v_scale' [B, S, K, 1]
  bfloat16 added; its other entries unchanged."""
  missing = [name for name in KEYS if name not in cache]
  if missing:
    raise errors.Error(f'an int8 cache quantizes the keys and values {list(KEYS)}; this cache has '
                       f'no {missing} (it has {sorted(cache)}).')
  out = dict(cache)
  for name in KEYS:
    out[name], out[f'{name}_scale'] = quantize_array(cache[name])
  return out


def dequantize(cache: Cache, dtype: Any = jnp.float32) -> Cache:
  """The inverse of quantize: 'k', 'v' [B, S, K, H] in dtype, the scales dropped.

  Only float32 (the default) keeps quantize(dequantize(cache)) == cache exactly; a narrower dtype
  rounds q * scale.
  """
  out = {name: value for name, value in cache.items()
         if name not in {f'{k}_scale' for k in KEYS}}
  for name in KEYS:
    out[name] = dequantize_array(cache[name], cache[f'{name}_scale'], dtype)
  return out


def kv_bytes(cache: Any) -> int:
  """Bytes held by the arrays of a cache pytree (a layer's or a model's), every leaf counted."""
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(cache))


def key_value_families() -> list[str]:
  """The decoding families whose caches hold keys and values ('k', 'v'): those an int8 cache
  serves. Found from the shapes of each family's one-position cache, every hyper-parameter its
  init_cache requires set to 1."""
  out = []
  for name in attention.names(decode=True):
    init = attention.get(name).init_cache
    required = {p.name: 1 for p in inspect.signature(init).parameters.values()
                if p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
                and p.name not in {'num_kv_heads', 'head_dim', 'dtype'}}
    shapes = jax.eval_shape(lambda init=init, required=required: init(
        1, 1, num_kv_heads=1, head_dim=1, dtype=jnp.float32, **required))
    if all(name_ in shapes for name_ in KEYS):
      out.append(name)
  return out
