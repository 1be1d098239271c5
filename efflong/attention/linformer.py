"""Linformer (Wang et al. 2020): softmax attention over keys and values projected along the length.

Section 4, eq. 7: head_i = softmax(q K^T E^T / sqrt(H)) F V, with learned E, F in R^{P x T_max}
(P is the paper's k, the projected length): each query attends P projected keys, so time and
memory are O(T * P). A shorter input of length S uses the first S columns of E and F.

Masks, as values:
- Padding: pad keys and values (segment id 0) are zeroed before the projection, so pad content
  never reaches a real token. (The zero projections of an all-pad column still take softmax mass:
  Linformer's projected keys are not tokens and cannot be masked one by one.)
- Packing: with `segments` = G, segment ids 1..G are projected apart, giving G * P projected keys of
  which a query sees only its own segment's P; sequences never mix. The cost is G * P keys per query.
- Causal masking is refused: every projected key mixes all positions, the future included.

The module `Projections` owns E and F; `share` (section 4, "parameter sharing") is 'none' (E, F per
kv head), 'headwise' (one E, F for all heads of a layer), 'kv' (E = F, for all heads) or
'layerwise' (one E = F for every layer of a stack).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efflong import errors
from efflong.attention import dense
from efflong.mask import Mask

SHARES = ('none', 'headwise', 'kv', 'layerwise')
CAUSAL_WHY = ('its projections E K and F V mix every position into each projected key, future ones '
              'included, so a causal mask cannot be honoured')


def check_segments(segment_ids: jax.Array, segments: int) -> None:
  """errors.CheckError for a segment id outside 0..segments, also under jit (see `errors.check`).

  An id above `segments` would be projected nowhere and its queries would silently get zeros.

  Args:
    segment_ids: [B, S] int, concrete or traced.
    segments: G, model.attention_kw.segments.
  """
  def message(low: np.ndarray, high: np.ndarray) -> str | None:
    low, high = int(low.min()), int(high.max())
    if low >= 0 and high <= segments:
      return None
    return (f'segment id {low if low < 0 else high} is outside 0..segments={segments}; set '
            'model.attention_kw.segments to the most sequences packed in a row.')

  low, high = jnp.min(segment_ids, initial=0), jnp.max(segment_ids, initial=0)
  errors.check(message, low, high, failed=(low < 0) | (high > segments))


def _project(x: jax.Array, proj: jax.Array, member: jax.Array | None) -> jax.Array:
  """Projects x along its length: [B, S, K, H] -> [B, G * P, K, H] float32.

  Args:
    x: [B, S, K, H] keys or values.
    proj: [K|1, P, S] the first S columns of E or F.
    member: [B, S, G] float, token s belongs to segment g + 1 (None: one segment, every token).
  """
  b, s, kh, h = x.shape
  shared = proj.shape[0] == 1
  e = proj[0] if shared else proj
  if member is None:  # One plain matmul per row (per head); XLA:CPU runs 3-operand einsums slowly.
    out = jnp.einsum('PS,BSKH->BPKH' if shared else 'KPS,BSKH->BPKH', e, x,
                     preferred_element_type=jnp.float32)
    return out
  out = jnp.einsum(f"{'PS' if shared else 'KPS'},BSG,BSKH->BGPKH", e, member, x,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, -1, kh, h)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, proj_k: jax.Array,
           proj_v: jax.Array, segments: int = 1) -> jax.Array:
  """Linformer attention with given projections.

  Args:
    q: [B, T, N, H].
    k, v: [B, S, K, H]; K divides N.
    mask: segment ids (padding, packing); must not be causal.
    proj_k: E [K|1, P, T_max], T_max >= S; from `Projections`.
    proj_v: F [K|1, P, T_max].
    segments: G, the most packed sequences in a row (segment ids 1..G).
  Returns:
    [B, T, N, H]; a pad query gets zeros.
  """
  dense.check_shapes(q, k, v, mask)
  if mask.causal:
    raise errors.Error(f'linformer cannot be causal: {CAUSAL_WHY}.')
  if mask.global_tokens is not None:
    raise errors.Error("linformer has no global tokens, but the mask (the batch field "
                       "'global_tokens') sets some; use longformer or bigbird.")
  if not isinstance(segments, int) or segments < 1:
    raise errors.Error(f'segments={segments!r} must be an int >= 1.')
  b, s, kh = k.shape[:3]
  for name, proj in (('proj_k', proj_k), ('proj_v', proj_v)):
    if proj.ndim != 3 or proj.shape[0] not in (1, kh) or proj.shape != proj_k.shape:
      raise errors.Error(f'{name} has shape {proj.shape}; expected [K={kh} or 1, P, T_max], both '
                         'alike.')
  p, max_len = proj_k.shape[1:]
  if s > max_len:
    raise errors.Error(f'input length {s} exceeds the Linformer projections\' max_len={max_len} '
                       '(task.seq_len at model creation); use a shorter input or a larger max_len.')
  seg = mask.kv_segment_ids
  if seg is None:
    member, inner = None, Mask(causal=False)
  else:
    check_segments(seg, segments)
    member = (seg[..., None] == jnp.arange(1, segments + 1)).astype(jnp.float32)  # [B, S, G]
    kv_seg = jnp.repeat(jnp.arange(1, segments + 1, dtype=seg.dtype), p)
    q_seg = mask.q_segment_ids
    inner = Mask(causal=False, q_segment_ids=jnp.ones(q.shape[:2], seg.dtype) if q_seg is None
                 else q_seg, kv_segment_ids=jnp.broadcast_to(kv_seg, (b, segments * p)))
  kp = _project(k, proj_k[..., :s], member).astype(k.dtype)
  vp = _project(v, proj_v[..., :s], member).astype(v.dtype)
  return dense.attend(q, kp, vp, mask=inner)


class Projections(nnx.Module):
  """Owns E (and F unless shared) [K|1, P, max_len]; x [B, T, D] -> {'proj_k': E, 'proj_v': F}."""

  def __init__(self, *, k: int, share: str, num_kv_heads: int, max_len: int, dtype: Any,
               rngs: nnx.Rngs):
    heads = num_kv_heads if share == 'none' else 1
    # Each projected key sums up to max_len tokens: std 1 / sqrt(max_len) keeps its scale.
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(in_axis=2, out_axis=1),
                                 (None, None, 'max_len'), eager_sharding=False)
    self.e = nnx.Param(init(rngs.params(), (heads, k, max_len), dtype))
    self.f = (None if share in ('kv', 'layerwise')
              else nnx.Param(init(rngs.params(), (heads, k, max_len), dtype)))

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    del x
    e = self.e[...]
    return {'proj_k': e, 'proj_v': e if self.f is None else self.f[...]}


def projections(hyper: dict[str, Any], *, k: int = 256, share: str = 'none', num_kv_heads: int,
                max_len: int | None, stack_modules: dict | None, dtype: Any, rngs: nnx.Rngs,
                **layer: Any) -> Projections:
  """The family module; k (the projected length P) and share are its hyper-parameters.

  With share='layerwise' every layer of a stack gets the same module, kept in stack_modules.
  """
  del hyper, layer
  if not isinstance(k, int) or k < 1:
    raise errors.Error(f'linformer k={k!r} must be an int >= 1 (the projected length).')
  if share not in SHARES:
    raise errors.Error(f'linformer share={share!r}; valid: {list(SHARES)}.')
  if max_len is None:
    raise errors.Error('linformer needs the model\'s max_len (task.seq_len) for its projections.')
  make = lambda: Projections(k=k, share=share, num_kv_heads=num_kv_heads, max_len=max_len,
                             dtype=dtype, rngs=rngs)
  if share != 'layerwise':
    return make()
  if stack_modules is None:
    raise errors.Error("linformer share='layerwise' needs a layer stack to share across.")
  if ('linformer', k) not in stack_modules:
    stack_modules['linformer', k] = make()
  return stack_modules['linformer', k]
