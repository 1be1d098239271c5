"""Longformer attention (Beltagy et al. 2020, Sec. 3.1): sliding window plus global tokens.

Query i sees key j when j is in i's (dilated) window, or i or j is a global token. Global tokens
come per example from the mask (`Mask.global_tokens`, the batch field 'global_tokens': a [CLS]
token, the question tokens) or, without it, are the first `global_tokens` positions.

Computed in three exact pieces, O(T * (window + G)) for G global slots:
  1. the window over non-global keys (block-sparse layout, global keys excluded);
  2. every query against the G global keys, merged with 1 by log-sum-exp;
  3. the G global rows against all keys, overwriting their rows.
Global rows use their own projections Q_g, K_g, V_g by default (Sec. 3.1, "Linear Projections for
Global Attention"): the layer passes them as `global_qkv`; piece 2 uses the ordinary K, V.

Causal, a global row sees only earlier keys, so the first G positions as global tokens decode token
by token: init_cache / attend_step keep the window ring of `local` plus the G global tokens' keys and
values (and their global projections), O(window + G) per row whatever the context. Per-example flags
(mask.global_tokens) are refused when decoding: a flagged token anywhere would attend to every
earlier key (through K_g, V_g), which only a cache of the whole context could serve.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efflong import errors
from efflong.attention import blocksparse, dense, local
from efflong.mask import Mask
from efflong.params import Dtype, head_projection


def global_slots(mask: Mask, t: int, count: int) -> tuple[jax.Array, jax.Array]:
  """Positions of the global tokens, G = count slots per row.

  Args:
    mask: its global_tokens [B, T] bool flags, or None for the first `count` positions.
    t: T.
    count: G. With flags from the batch, the first G flagged positions of a row are its global
      tokens; a row must flag at most G (`check_flags`).
  Returns:
    index [B|1, G] int32 (T where the slot is unused) and valid [B|1, G] bool.
  """
  flags = (jnp.arange(t) < count)[None] if mask.global_tokens is None else mask.global_tokens
  index = jax.vmap(lambda f: jnp.nonzero(f, size=count, fill_value=t)[0])(flags.astype(bool))
  return index.astype(jnp.int32), index < t


def check_flags(flags: jax.Array, count: int) -> None:
  """errors.CheckError when a row flags more than `count` global tokens, also under jit (see
  `errors.check`): `global_slots` would drop the flags beyond the first `count` silently.

  Args:
    flags: [B, T] bool, the batch field 'global_tokens', concrete or traced.
    count: G, model.attention_kw.global_tokens.
  """
  def message(most: np.ndarray) -> str | None:
    most = int(most.max())
    if most <= count:
      return None
    return (f'a row flags {most} global tokens; the attention has global_tokens={count} slots; '
            'set model.attention_kw.global_tokens to the most a row flags.')

  most = jnp.max(jnp.sum(flags.astype(jnp.int32), axis=-1), initial=0)
  errors.check(message, most, failed=most > count)


def attend_with_globals(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask,
                        layout: blocksparse.Layout, global_tokens: int,
                        global_qkv: tuple[jax.Array, jax.Array, jax.Array] | None,
                        scale: float, impl: str) -> jax.Array:
  """A layout's pattern plus global rows and columns; see the module docstring.

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H].
    mask: causal flag, segment ids and optional global token flags.
    layout: the pattern of the non-global part.
    global_tokens: G, the number of global slots (0: none, and the mask must not flag any).
    global_qkv: (q_g [B, T, N, H], k_g, v_g [B, T, K, H]) for the global rows, or None to use q, k, v.
    scale: logit scale.
    impl: 'xla' or 'pallas' for the layout's part (piece 1); pieces 2 and 3 are O(T * G) and
      stay in XLA.
  Returns:
    [B, T, N, H] float32.
  """
  b, t = q.shape[:2]
  if global_tokens == 0:
    if mask.global_tokens is not None:
      raise errors.Error("the batch flags global tokens but the attention has global_tokens=0 "
                         'slots; set global_tokens to the most a row flags.')
    return blocksparse.attend_layout(q, k, v, mask=mask, layout=layout, scale=scale,
                                     impl=impl)[0]
  if mask.global_tokens is not None:
    check_flags(mask.global_tokens, global_tokens)
  index, valid = global_slots(mask, t, global_tokens)                 # [B|1, G]
  index = jnp.broadcast_to(index, (b, global_tokens))
  valid = jnp.broadcast_to(valid, (b, global_tokens))
  is_global = jnp.zeros((b, t + 1), bool).at[jnp.arange(b)[:, None], index].set(True)[:, :t]
  seg = mask.q_segment_ids
  pos = jnp.arange(t)

  window = blocksparse.attend_layout(q, k, v, mask=mask, layout=layout, scale=scale,
                                     exclude=is_global, impl=impl)
  take = lambda x: jnp.take_along_axis(x, jnp.minimum(index, t - 1)[:, :, None, None], axis=1)
  cols_ok = valid[:, None, :] & mask.allowed(
      pos[None, :, None], index[:, None, :],
      None if seg is None else seg[:, :, None],
      None if seg is None else jnp.take_along_axis(seg, jnp.minimum(index, t - 1), 1)[:, None],
      t, t)
  cols = dense.attend_allowed(q, take(k), take(v), cols_ok[:, None], scale)
  out, _ = blocksparse.merge([window, cols])

  qg, kg, vg = (q, k, v) if global_qkv is None else global_qkv
  rows_ok = valid[:, :, None] & mask.allowed(
      index[:, :, None], pos[None, None, :],
      None if seg is None else jnp.take_along_axis(seg, jnp.minimum(index, t - 1), 1)[:, :, None],
      None if seg is None else seg[:, None, :], t, t)
  rows, _ = dense.attend_allowed(take(qg), kg, vg, rows_ok[:, None], scale)    # [B, G, N, H]
  return out.at[jnp.arange(b)[:, None], index].set(rows, mode='drop')


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, window: int,
           dilation: local.Dilation = 1, global_tokens: int = 0, separate_global: bool = True,
           global_qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
           block: int | None = None, scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """Longformer attention.

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H]; K divides N.
    mask: causal flag, segment ids, and optional per-example global token flags.
    window: keys on each side of a query, in units of the dilation (as in `local`).
    dilation: one int, or one per query head.
    global_tokens: G, global slots per row: the first G positions, or the first G the mask flags.
    separate_global: global rows use their own projections, passed as global_qkv.
    global_qkv: (q_g, k_g, v_g) shaped like (q, k, v); required when separate_global and G > 0.
    block: tile size of the window's layout (default from the window).
    scale: logit scale; default H ** -0.5.
    impl: 'xla' or 'pallas' (efflong.kernels.flash_attention), see `blocksparse.attend_layout`.
  Returns:
    [B, T, N, H].
  """
  local.check_positive(window=window, dilation=dilation,
                       **({} if block is None else dict(block=block)))
  local.check_self(q, k, v, mask, 'longformer', global_tokens=True)
  t, n, h = q.shape[1:]
  if not isinstance(global_tokens, int) or not 0 <= global_tokens <= t:
    raise errors.Error(f'global_tokens={global_tokens!r} must be an int in [0, T={t}].')
  if separate_global and global_tokens and global_qkv is None:
    raise errors.Error('longformer with separate_global=True needs global_qkv=(q_g, k_g, v_g) '
                       '(the attention layer makes them); or set separate_global=False.')
  layout = local.band_layout(t, t, window=window, dilation=dilation, causal=mask.causal, heads=n,
                             block=block or local.default_block(window))
  out = attend_with_globals(q, k, v, mask=mask, layout=layout, global_tokens=global_tokens,
                            global_qkv=global_qkv if separate_global else None,
                            scale=h ** -0.5 if scale is None else scale, impl=impl)
  return out.astype(q.dtype)


class GlobalProjections(nnx.Module):
  """Q_g, K_g, V_g: the global rows' own projections, x [B, T, D] -> {'global_qkv': (q, k, v)}."""

  def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype: Dtype, rngs: nnx.Rngs):
    self.q = head_projection(d_model, num_heads, head_dim, dtype=dtype, rngs=rngs)
    self.k = head_projection(d_model, num_kv_heads, head_dim, dtype=dtype, rngs=rngs)
    self.v = head_projection(d_model, num_kv_heads, head_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    return {'global_qkv': (self.q(x), self.k(x), self.v(x))}


def global_projections(hyper: dict[str, Any], *, d_model: int, num_heads: int, num_kv_heads: int,
                       head_dim: int, dtype: Dtype, rngs: nnx.Rngs,
                       **layer: Any) -> GlobalProjections | None:
  """The family module: projections when there are global slots and separate_global is on."""
  del layer
  if not hyper.get('global_tokens') or not hyper.get('separate_global', True):
    return None
  return GlobalProjections(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, dtype=dtype, rngs=rngs)


def init_cache(batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype, window: int,
               dilation: local.Dilation = 1, global_tokens: int = 0,
               separate_global: bool = True) -> dict[str, jax.Array]:
  """An empty cache: the window ring of `local.init_cache` plus global_k, global_v [B, G, K, H]
  (and global_kg, global_vg, the global projections' keys and values, when separate_global).

  Its size does not depend on max_len.
  """
  if not isinstance(global_tokens, int) or not 0 <= global_tokens <= max_len:
    raise errors.Error(f'global_tokens={global_tokens!r} must be an int in [0, max_len={max_len}].')
  cache = local.init_cache(batch, max_len, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           dtype=dtype, window=window, dilation=dilation)
  slots = jnp.zeros((batch, global_tokens, num_kv_heads, head_dim), dtype)
  names = ('global_k', 'global_v') + (('global_kg', 'global_vg') if separate_global else ())
  return {**cache, **{name: slots for name in names}} if global_tokens else cache


def step_with_globals(q: jax.Array, part: tuple[jax.Array, jax.Array], keys: jax.Array,
                      values: jax.Array, rows_qkv: tuple[jax.Array, jax.Array, jax.Array],
                      positions: jax.Array, scale: float) -> jax.Array:
  """A decoding step's global columns and rows (pieces 2 and 3 of the module docstring), with the
  first G positions as the global tokens.

  Args:
    q: [B, T, N, H] the new queries.
    part: (out [B, T, N, H], lse [B, T, N]) of each query over its pattern's non-global keys.
    keys, values: [B, G, K, H] of positions 0..G-1 (all those up to the new positions written).
    rows_qkv: (q_g [B, T, N, H], k_g, v_g [B, G, K, H]) for the global rows.
    positions: [B, T] absolute positions of the new queries.
    scale: logit scale.
  Returns:
    [B, T, N, H] float32.
  """
  g = keys.shape[1]
  seen = (jnp.arange(g) <= positions[:, :, None])[:, None]              # [B, 1, T, G]
  out, _ = blocksparse.merge([part, dense.attend_allowed(q, keys, values, seen, scale)])
  rows, _ = dense.attend_allowed(*rows_qkv, seen, scale)
  return jnp.where((positions < g)[:, :, None, None], rows, out)


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, window: int, dilation: local.Dilation = 1, global_tokens: int = 0,
                separate_global: bool = True,
                global_qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                block: int | None = None,
                scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal Longformer attention of T new positions over the cache and themselves.

  A query at position p >= G sees its window's non-global keys and the G global keys; a global
  token (p < G) sees every key up to p through its global projections, all of them global.

  Args:
    q: [B, T, N, H] queries of the new positions (absolute positions cache['length'] + i).
    k, v: [B, T, K, H] their keys and values; K divides N.
    cache: from init_cache.
    mask: causal; q_segment_ids [B, T] marks real new positions (1) and right-padding (0); no
      global_tokens flags (see the module docstring).
    window, dilation, global_tokens, separate_global: as in `attend`.
    global_qkv: (q_g, k_g, v_g) of the new positions, shaped like (q, k, v), as in `attend`.
    block: attend's tile size; unused here (a step gathers its keys).
    scale: logit scale; default H ** -0.5.
  Returns:
    out [B, T, N, H] (finite, arbitrary at padding) and the cache with the real positions added.
  """
  del block
  local.check_positive(window=window, dilation=dilation)
  local.check_step(q, k, v, mask, 'longformer', global_tokens=True)
  g = global_tokens
  if not isinstance(g, int) or g < 0 or (g and cache['global_k'].shape[1] != g):
    raise errors.Error(f'global_tokens={g!r} must be an int >= 0 and match the cache\'s slots.')
  if separate_global and g and global_qkv is None:
    raise errors.Error('longformer with separate_global=True needs global_qkv=(q_g, k_g, v_g) '
                       '(the attention layer makes them); or set separate_global=False.')
  scale = q.shape[3] ** -0.5 if scale is None else scale
  positions, real, length = dense.new_positions(cache, mask, q.shape[1])
  keys, values, x, allowed, ring = local.window_step(k, v, cache, positions, real, length,
                                                     window=window, dilation=dilation,
                                                     heads=q.shape[2])
  part = blocksparse.attend_gathered(q, keys, values, allowed & (x >= g), scale)
  if not g:
    return part[0].astype(q.dtype), ring
  new = {'global_k': k, 'global_v': v}
  if separate_global:
    new.update(global_kg=global_qkv[1], global_vg=global_qkv[2])
  slots = {name: dense.write(cache[name], positions, real, fresh) for name, fresh in new.items()}
  rows_qkv = ((global_qkv[0], slots['global_kg'], slots['global_vg']) if separate_global
              else (q, slots['global_k'], slots['global_v']))
  out = step_with_globals(q, part, slots['global_k'], slots['global_v'], rows_qkv, positions,
                          scale)
  return out.astype(q.dtype), {**ring, **slots}
