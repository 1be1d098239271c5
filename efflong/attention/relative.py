"""Relative positional attention of Transformer-XL (Dai et al. 2019, section 3.3).

score(i, j) = (q_i + u)^T k_j + (q_i + v)^T W_R r_{i-j}: the paper's terms (a) + (c) and (b) + (d),
with r the sinusoidal encoding of the distance i - j between query i and key j, and u, v learned
per-head biases. Queries sit at the end of the keys (Mask's alignment): with S - T keys of memory
before the segment, query t is at key position S - T + t. The position term is computed for the
S + T - 1 distances S - 1, ..., -(T - 1) once, [B, N, T, S + T - 1], and moved into place by the
shift trick (section B of the paper's appendix): O(T * (T + S)) memory, never a gathered
[T, S, H] tensor of encodings.

r is efflong.sinusoids.sinusoidal (tensor2tensor's timing signal). The authors' code also puts the
sines before the cosines, but at the paper's frequencies 10000^(-2i / D), i < D / 2 (those of
efflong.sinusoids.sinusoidal_paper, not interleaved).

Decoding (`init_cache`, `attend_step`): the model runs segments of segment_len positions, each after a
memory of the mem_len positions before it, so the query at absolute position t, in segment
s = t // segment_len, sees the keys from s * segment_len - mem_len to t, at relative distances that
continue across segments. The cache holds the keys and values of the last mem_len + segment_len
positions (in position order), which covers every query's window.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efflong import errors
from efflong.attention.dense import attend_allowed, check_shapes
from efflong.mask import Mask
from efflong.params import partitioned
from efflong.sinusoids import sinusoidal


def distances(q_len: int, kv_len: int) -> jax.Array:
  """[S + T - 1] the distances i - j the position term is computed for, S - 1 down to -(T - 1)."""
  return jnp.arange(kv_len - 1, -q_len, -1)


def rel_shift(x: jax.Array, kv_len: int) -> jax.Array:
  """[..., T, S + T - 1] by distance (as `distances`) -> [..., T, S] by key position.

  Out[i, j] = x[i, j + T - 1 - i]: query i's distance to key j is S - T + i - j, which is
  column j + T - 1 - i. A zero column and a flat reshape do the per-row shift without a gather.
  """
  *lead, t, length = x.shape
  flat = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, 1)]).reshape(*lead, t * (length + 1))
  return flat[..., t - 1:t - 1 + t * length].reshape(*lead, t, length)[..., :kv_len]


def position_logits(q: jax.Array, pos_proj: jax.Array, pos_bias: jax.Array,
                    kv_len: int) -> jax.Array:
  """Terms (b) + (d): [B, N, T, S] float32, (q_i + v)^T W_R r_{i-j}.

  Args:
    q: [B, T, N, H].
    pos_proj: W_R [E, N, H], E the width of the sinusoidal encoding.
    pos_bias: v [N, H].
    kv_len: S.
  """
  t = q.shape[1]
  r = sinusoidal(distances(t, kv_len), pos_proj.shape[0])  # [S + T - 1, E]
  r = jnp.einsum('LE,ENH->LNH', r.astype(pos_proj.dtype), pos_proj)
  raw = jnp.einsum('BTNH,LNH->BNTL', q + pos_bias.astype(q.dtype), r,
                   preferred_element_type=jnp.float32)
  return rel_shift(raw, kv_len)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, pos_proj: jax.Array,
           content_bias: jax.Array, pos_bias: jax.Array, scale: float | None = None) -> jax.Array:
  """Softmax attention with Transformer-XL's relative positions.

  Args:
    q: [B, T, N, H] queries.
    k, v: [B, S, K, H] keys and values (S >= T: memory first, then the segment); K divides N.
    mask: which keys each query sees (causal alignment: query t at key position S - T + t).
    pos_proj: W_R [E, N, H], projecting the E-wide sinusoidal distance encoding into each head.
    content_bias: u [N, H].
    pos_bias: v [N, H].
    scale: logit scale; default H ** -0.5 (on both terms).
  Returns:
    [B, T, N, H]; a query that sees no key gets zeros.
  """
  check_shapes(q, k, v, mask)
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  scale = h ** -0.5 if scale is None else scale
  bias = position_logits(q, pos_proj, pos_bias, s) * scale
  out, _ = attend_allowed(q + content_bias.astype(q.dtype), k, v, mask.materialize(t, s)[:, None],
                          scale, bias)
  return out.astype(q.dtype)


def init_cache(batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype: Any,
               mem_len: int, segment_len: int) -> dict[str, jax.Array]:
  """The empty decoding cache (see the module docstring).

  Args:
    batch: B.
    max_len: the longest sequence; the window W = min(mem_len + segment_len, max_len).
    num_kv_heads, head_dim, dtype: of the cached keys and values.
    mem_len: M, the segment memory of the model (model.mem_len, >= 0).
    segment_len: L, the model's segment length (>= 1).
  Returns:
    'length' [B] int32; 'k', 'v' [B, W, K, H]: slot j holds absolute position length - W + j (a
    negative one: nothing yet); 'mem_len', 'segment_len' [B] int32 (M and L, for attend_step).
  """
  for name, value, low in (('mem_len', mem_len, 0), ('segment_len', segment_len, 1)):
    if not isinstance(value, int) or value < low:
      raise errors.Error(f'xl decoding needs {name} an int >= {low}; got {value!r}.')
  window = min(mem_len + segment_len, max_len)
  kv = jnp.zeros((batch, window, num_kv_heads, head_dim), dtype)
  return {'length': jnp.zeros((batch,), jnp.int32), 'k': kv, 'v': kv,
          'mem_len': jnp.full((batch,), mem_len, jnp.int32),
          'segment_len': jnp.full((batch,), segment_len, jnp.int32)}


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, pos_proj: jax.Array, content_bias: jax.Array, pos_bias: jax.Array,
                scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`attend` of new positions q [B, T, N, H], k, v [B, T, K, H] after the cached ones, each query
  over its segment's window (see the module docstring); O((W + T) T) per call.

  mask.q_segment_ids [B, T]: 1 on real new positions, 0 on right-padding (None: all real).
  Returns out [B, T, N, H] and the cache advanced past the real positions.
  """
  b, t, _, h = q.shape
  w = cache['k'].shape[1]
  scale = h ** -0.5 if scale is None else scale
  real = jnp.ones((b, t), bool) if mask.q_segment_ids is None else mask.q_segment_ids != 0
  keys = jnp.concatenate([cache['k'], k.astype(cache['k'].dtype)], axis=1)   # [B, W + T, K, H]
  values = jnp.concatenate([cache['v'], v.astype(cache['v'].dtype)], axis=1)
  length = cache['length'][:, None]
  k_pos = length - w + jnp.arange(w + t)                                    # [B, W + T]
  q_pos = length + jnp.arange(t)                                            # [B, T]
  first = (q_pos // cache['segment_len'][:, None] * cache['segment_len'][:, None]
           - cache['mem_len'][:, None])                                     # [B, T]
  k_real = jnp.concatenate([k_pos[:, :w] >= 0, real], axis=1)
  allowed = (k_real[:, None] & (k_pos[:, None] <= q_pos[..., None])
             & (k_pos[:, None] >= first[..., None]))                        # [B, T, W + T]
  # `attend`'s alignment puts query i at key index W + i: distance W + i - j = q_pos - k_pos.
  bias = position_logits(q, pos_proj, pos_bias, w + t) * scale
  out, _ = attend_allowed(q + content_bias.astype(q.dtype), keys, values, allowed[:, None], scale,
                          bias)
  keep = (real.sum(1, dtype=jnp.int32)[:, None] + jnp.arange(w))[..., None, None]  # [B, W, 1, 1]
  new = dict(cache, length=cache['length'] + real.sum(1, dtype=jnp.int32),
             k=jnp.take_along_axis(keys, keep, axis=1), v=jnp.take_along_axis(values, keep, axis=1))
  return out.astype(q.dtype), new


class RelativeParams(nnx.Module):
  """Owns W_R [E, N, H], u and v [N, H]; x [B, T, D] -> attend's pos_proj, content_bias, pos_bias."""

  def __init__(self, *, d_model: int, num_heads: int, head_dim: int, dtype: Any, rngs: nnx.Rngs):
    proj_init = partitioned(nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                            'embed', 'heads', 'head_dim')
    bias_init = partitioned(nnx.initializers.zeros, 'heads', 'head_dim')
    self.pos_proj = nnx.Param(proj_init(rngs.params(), (d_model, num_heads, head_dim), dtype))
    self.content_bias = nnx.Param(bias_init(rngs.params(), (num_heads, head_dim), dtype))
    self.pos_bias = nnx.Param(bias_init(rngs.params(), (num_heads, head_dim), dtype))

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    del x
    return {'pos_proj': self.pos_proj[...], 'content_bias': self.content_bias[...],
            'pos_bias': self.pos_bias[...]}


def relative_params(hyper: dict[str, Any], *, d_model: int, num_heads: int, head_dim: int,
                    dtype: Any, rngs: nnx.Rngs, **layer: Any) -> RelativeParams:
  """The family module: one W_R, u, v per attention layer (the distance encoding is d_model wide)."""
  del hyper, layer
  return RelativeParams(d_model=d_model, num_heads=num_heads, head_dim=head_dim, dtype=dtype,
                        rngs=rngs)
