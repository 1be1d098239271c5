"""Context-parallel twins of local, longformer, linear and performer; why lsh has none.

A twin runs inside jax.shard_map over one mesh axis `axis_name` of c devices; device d holds the
contiguous block d of the length axis, n = T / c positions (global positions d * n + i). It takes
`twin(q, k, v, *, mask, axis_name, **hyper)` with the family attend's hyper-parameters and inputs,
the mask's segment ids (and global token flags) sliced to the block, and returns the block of the
family's `attend` on the whole arrays: values and gradients (every exchange is a ppermute,
all_gather or psum, which JAX transposes). See `efflong.attention.Family.context`.

Exchanges, and the bytes one device receives per layer and call (forward; the backward pass sends
the cotangents of the same arrays back), with W = window * max(dilation) (`local.ring_size`),
e = bytes per key/value element, B batch, K kv heads, N query heads, H head dim, M features,
L = ceil(log2 c) + 1 (the steps of the prefix scan `_exclusive_scan`):

- local (`local`): a halo. Each device receives the W keys and values just before its block from
  the previous devices by ppermute (bidirectional: also the W after it from the next ones), hop by
  hop when W > n (from d - 1, d - 2, ...: ceil(W / n) ppermutes, positions before the sequence
  are masked). It runs `local.attend` on halo + block + halo, queries too (zeros in the halos,
  their outputs dropped): extra work (n + 2W) / n per device (causal (n + W) / n).
  Bytes: B W (2 K H e + 4) per direction (the 4: segment ids, only when the mask has them).
- longformer (`longformer`): the window part as local (global keys excluded, as in the family);
  the global tokens' positions from the all-gathered flags ((c - 1) B n bytes, when the mask
  flags them), their keys, values and global queries by a psum (about 2 B G (2 K + N) H e bytes:
  a ring all-reduce); the global rows attend to every device's keys, each device's part
  (out, log-sum-exp) all-gathered and merged ((c - 1) B G N (H + 1) 4 bytes).
- linear (`linear`), performer (`performer`): each device sums its block's state S = sum
  phi(k) v^T, z = sum phi(k) over the run (segment) open at its end and passes it on by an
  exclusive segmented scan over the devices (`_exclusive_scan`, Hillis-Steele on ppermute; a run
  that covers a whole block carries its predecessor's state through). The block's chunked prefix
  sums then add the carried state to the queries of the run open at its start (Katharopoulos et
  al. 2020, Sec. 3.3: the causal sums are prefix sums, so a prefix over devices composes with the
  prefix inside the block). Bidirectional: without segments one psum of (S, z); with segments a
  second, reversed scan for the anti-causal pass. Causal FAVOR+ features carry a running max
  (`performer.key_features`): a scan of the block maxima first (a prefix max over devices,
  features rescaled), then the states; bidirectional, the run max comes from a forward and a
  reversed scan of the maxima. The feature matrix W is replicated.
  Bytes: L B K (M H + M + 2) 4 per scan (performer's max scans: L B K 8 each); the psum about
  2 B K (M H + M) 4.
- lsh: none (`LSH_WHY`, the registry's context_why). Exactly, a round's sorted order and chunks
  span the devices: each device would count its buckets (all-gathered histograms give every
  token its global sorted slot), send its tokens to the owners of their slots (an all-to-all of
  ragged runs, padded to n per pair: O(T) per device) and back, and the duplicate count needs
  every round's slot of each token; the causal band needs each bucket's C latest keys from all
  earlier devices (about 2 T H per head and round). LSH within each block plus a neighbour is
  cheap but a different model than the one trained on one device, so it is not offered.

The segment ids are contiguous runs (the kernel families' own requirement, as packing makes them).
The kernel twins call linear's and performer's module-private pieces (`linear._prefix_from`,
`_ratio`, `_check_chunk`, `_feature_map`; `performer._run_max`, `_check`, `_eps`): the very code
their attend runs, so a twin cannot drift from its family.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from efflong import errors, kernels
from efflong.attention import blocksparse, dense, linear, local, longformer, performer
from efflong.mask import Mask

LSH_WHY = ('its hash buckets are sorted over the whole sequence (an exact twin needs a '
           'distributed sort of every round; LSH within each block would be another model)')


def _layout(axis_name: str, n: int) -> tuple[int, jax.Array]:
  """(c, this device's first global position)."""
  return jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name) * n


def _neighbours(x: jax.Array, size: int, axis_name: str, *, after: bool) -> jax.Array:
  """The `size` positions just before this device's block (after: just after it), [B, size, ...],
  from the previous (next) devices by one ppermute per device reached; zeros outside the
  sequence."""
  c, n = jax.lax.axis_size(axis_name), x.shape[1]
  parts = []
  for hop in range(1, min(c - 1, -(-size // n)) + 1):
    take = min(n, size - (hop - 1) * n)
    perm = ([(i, i - hop) for i in range(hop, c)] if after
            else [(i, i + hop) for i in range(c - hop)])
    parts.append(jax.lax.ppermute(x[:, :take] if after else x[:, n - take:], axis_name, perm))
  fill = jnp.zeros((x.shape[0], size - sum(p.shape[1] for p in parts), *x.shape[2:]), x.dtype)
  return jnp.concatenate(parts + [fill] if after else [fill] + parts[::-1], axis=1)


class _Halo(NamedTuple):
  """A block with its halo: W positions before it and, bidirectionally, W after it."""

  q: jax.Array       # [B, W + n (+ W), N, H], zeros in the halo
  k: jax.Array       # [B, W + n (+ W), K, H]
  v: jax.Array
  mask: Mask         # segment ids over the extended block; positions outside the sequence get
                     # one no query of the block has
  pos: jax.Array     # [W + n (+ W)] global positions


def _halo(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, size: int,
          axis_name: str) -> _Halo:
  """The block extended by `size` neighbouring keys and values each side it needs (causal: the
  previous ones only)."""
  c, start = _layout(axis_name, q.shape[1])
  before, after = size, 0 if mask.causal else size

  def extend(x: jax.Array) -> jax.Array:
    parts = [_neighbours(x, size, axis_name, after=False), x]
    return jnp.concatenate(parts + ([_neighbours(x, size, axis_name, after=True)] if after
                                    else []), axis=1)

  pad = lambda x: jnp.pad(x, ((0, 0), (before, after), (0, 0), (0, 0)))
  pos = start - before + jnp.arange(before + q.shape[1] + after)
  inside = (pos >= 0) & (pos < c * q.shape[1])
  ids = mask.q_segment_ids
  if ids is None:
    ids = jnp.where(inside, 0, -1)[None]
  else:
    ids = jnp.where(inside, extend(ids), jnp.min(ids, axis=1, keepdims=True) - 1)
  ext = Mask.from_segments(jnp.broadcast_to(ids, (q.shape[0], ids.shape[1])), causal=mask.causal)
  return _Halo(pad(q), extend(k), extend(v), ext, pos)


def local_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: str,
                 window: int, dilation: local.Dilation = 1, block: int | None = None,
                 scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """`local.attend` on this device's block (halo exchange; see the module docstring).

  Args:
    q: [B, n, N, H] this device's block of queries.
    k, v: [B, n, K, H] the same block of keys and values.
    mask: causal flag and segment ids of the block.
    axis_name: the mesh axis the length is split over.
    window, dilation, block, scale, impl: as `local.attend`.
  Returns:
    [B, n, N, H], the block of `local.attend` over the whole sequence.
  """
  local.check_positive(window=window, dilation=dilation)
  local.check_self(q, k, v, mask, 'local')
  size = local.ring_size(window, dilation)
  ext = _halo(q, k, v, mask, size, axis_name)
  out = local.attend(ext.q, ext.k, ext.v, mask=ext.mask, window=window, dilation=dilation,
                     block=block, scale=scale, impl=impl)
  return out[:, size:size + q.shape[1]]


def longformer_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: str,
                      window: int, dilation: local.Dilation = 1, global_tokens: int = 0,
                      separate_global: bool = True,
                      global_qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                      block: int | None = None, scale: float | None = None,
                      impl: str = 'xla') -> jax.Array:
  """`longformer.attend` on this device's block: the window by a halo, the global tokens gathered
  (see the module docstring; the three pieces of `longformer.attend_with_globals`).

  Args:
    q: [B, n, N, H] this device's block of queries.
    k, v: [B, n, K, H] the same block of keys and values.
    mask: causal flag, segment ids and global token flags of the block.
    axis_name: the mesh axis the length is split over.
    window, dilation, global_tokens, separate_global, block, scale, impl: as `longformer.attend`.
    global_qkv: (q_g, k_g, v_g), the block of the global projections, shaped like (q, k, v).
  Returns:
    [B, n, N, H], the block of `longformer.attend` over the whole sequence.
  """
  local.check_positive(window=window, dilation=dilation)
  local.check_self(q, k, v, mask, 'longformer', global_tokens=True)
  (b, n, heads, h), g = q.shape, global_tokens
  c, start = _layout(axis_name, n)
  t = c * n
  if not isinstance(g, int) or not 0 <= g <= t:
    raise errors.Error(f'global_tokens={g!r} must be an int in [0, T={t}].')
  if separate_global and g and global_qkv is None:
    raise errors.Error('longformer with separate_global=True needs global_qkv=(q_g, k_g, v_g) '
                       '(the attention layer makes them); or set separate_global=False.')
  size = local.ring_size(window, dilation)
  ext = _halo(q, k, v, mask, size, axis_name)
  if g == 0:
    return longformer.attend(ext.q, ext.k, ext.v, mask=ext.mask, window=window, dilation=dilation,
                             block=block, scale=scale, impl=impl)[:, size:size + n]
  scale = h ** -0.5 if scale is None else scale
  flags = mask.global_tokens
  if flags is not None:
    flags = jax.lax.all_gather(flags, axis_name, axis=1, tiled=True)      # [B, T]
    longformer.check_flags(flags, g)
  index, valid = longformer.global_slots(Mask(global_tokens=flags), t, g)  # global positions
  index, valid = jnp.broadcast_to(index, (b, g)), jnp.broadcast_to(valid, (b, g))
  mine = valid & (index >= start) & (index < start + n)
  slot = jnp.where(mine, index - start, 0)

  def gather(x: jax.Array) -> jax.Array:  # [B, n, ...] -> [B, G, ...] at the global slots
    x = jnp.take_along_axis(x, slot.reshape(b, g, *(1,) * (x.ndim - 2)), axis=1)
    return jax.lax.psum(jnp.where(mine.reshape(b, g, *(1,) * (x.ndim - 2)), x, 0), axis_name)

  # 1. The window over non-global keys.
  is_global = jnp.any(valid[:, :, None] & (index[:, :, None] == ext.pos), axis=1)
  layout = local.band_layout(ext.pos.shape[0], ext.pos.shape[0], window=window, dilation=dilation,
                             causal=mask.causal, heads=heads,
                             block=block or local.default_block(window))
  win, lse = blocksparse.attend_layout(ext.q, ext.k, ext.v, mask=ext.mask, layout=layout,
                                       scale=scale, exclude=is_global, impl=impl)
  part = win[:, size:size + n], lse[:, size:size + n]
  # 2. Every query against the global keys.
  seg = mask.q_segment_ids
  gseg = None if seg is None else gather(seg)
  pos = start + jnp.arange(n)
  cols_ok = valid[:, None, :] & mask.allowed(
      pos[None, :, None], index[:, None, :], None if seg is None else seg[:, :, None],
      None if seg is None else gseg[:, None, :], t, t)
  out, _ = blocksparse.merge([part, dense.attend_allowed(q, gather(k), gather(v),
                                                         cols_ok[:, None], scale)])
  # 3. The global rows against every device's keys, the devices' parts merged.
  qg, kg, vg = global_qkv if separate_global else (q, k, v)
  rows_ok = valid[:, :, None] & mask.allowed(
      index[:, :, None], pos[None, None, :], None if seg is None else gseg[:, :, None],
      None if seg is None else seg[:, None, :], t, t)
  rows, lse = dense.attend_allowed(gather(qg), kg, vg, rows_ok[:, None], scale)  # [B, G, N, H]
  parts = jax.lax.all_gather((rows, lse), axis_name)
  rows, _ = blocksparse.merge([(parts[0][i], parts[1][i]) for i in range(c)])
  out = out.at[jnp.arange(b)[:, None], jnp.where(mine, slot, n)].set(rows, mode='drop')
  return out.astype(q.dtype)


class _Run(NamedTuple):
  """A block's summary for the scan over devices: the state of the run open at its end.

  Attributes:
    s: [B, K, M, H] sum of phi(k) v^T over the run's keys in the block (times exp(-scale)), or
      None (a scan of the maxima only).
    z: [B, K, M] sum of phi(k) (times exp(-scale)), or None.
    open_id: [B] the run's segment id.
    scale: [B, K] the key log-scale at the block's last position (zeros without one).
    through: [B] bool, the run covers the whole block (it continues the previous block's).
  """

  s: jax.Array | None
  z: jax.Array | None
  open_id: jax.Array
  scale: jax.Array
  through: jax.Array


def _then(a: _Run, b: _Run) -> _Run:
  """The summary of block a followed by block b (associative): b's run takes a's state when it
  covers b and continues a's run, both brought to the larger of their scales."""
  keep = b.through & (a.open_id == b.open_id)                          # [B]
  scale = jnp.where(keep[:, None], jnp.maximum(a.scale, b.scale), b.scale)
  wa = jnp.where(keep[:, None], jnp.exp(a.scale - scale), 0.0)         # [B, K]
  wb = jnp.exp(b.scale - scale)
  add = lambda xa, xb, w_a, w_b: None if xb is None else xb * w_b + xa * w_a
  return _Run(add(a.s, b.s, wa[..., None, None], wb[..., None, None]),
              add(a.z, b.z, wa[..., None], wb[..., None]), b.open_id, scale, a.through & keep)


def _exclusive_scan(run: _Run, axis_name: str, *, reverse: bool = False) -> tuple[_Run, jax.Array]:
  """The summary of the devices before this one (reverse: after it, nearest last), by a
  Hillis-Steele scan over the axis (ceil(log2 c) ppermutes, then one shift).

  Returns:
    (the combined summary, has [] bool: there is at least one such device).
  """
  c, d = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  rank = c - 1 - d if reverse else d

  def shift(x: _Run, hop: int) -> _Run:
    perm = [(i, i - hop) for i in range(hop, c)] if reverse else [(i, i + hop) for i in
                                                                  range(c - hop)]
    return jax.lax.ppermute(x, axis_name, perm)

  pick = lambda ok, x, y: jax.tree.map(lambda u, w: jnp.where(ok, u, w), x, y)
  hop = 1
  while hop < c:
    run = pick(rank >= hop, _then(shift(run, hop), run), run)
    hop *= 2
  return shift(run, 1), rank >= 1


def _block_run(kf: jax.Array, v: jax.Array, seg: jax.Array, scale: jax.Array) -> _Run:
  """A block's summary: the state of its last run, scaled as `linear._prefix_from` scales its
  carry (to the last position's key scale).

  Args:
    kf: [B, n, K, M] key features (times exp(-scale)); v: [B, n, K, H].
    seg: [B, n] segment ids.
    scale: [B, n, K] the key log-scale (zeros without one).
  """
  last = seg[:, -1]
  in_last = (seg == last[:, None])[..., None]
  weight = jnp.where(in_last, jnp.exp(jnp.minimum(scale - scale[:, -1:], 0.0)), 0.0)  # [B, n, K]
  return _Run(jnp.einsum('BTKM,BTKH,BTK->BKMH', kf, v, weight),
              jnp.einsum('BTKM,BTK->BKM', kf, weight), last, scale[:, -1],
              jnp.all(seg == last[:, None], axis=1))


def _first_run(seg: jax.Array, open_id: jax.Array, has: jax.Array) -> jax.Array:
  """[B, n] bool: the positions of the block's first run when it continues the run `open_id`
  left open by the previous devices (has: there are such devices)."""
  head = jnp.cumprod((seg == seg[:, :1]).astype(jnp.int32), axis=1).astype(bool)
  return has & head & (seg[:, :1] == open_id[:, None])


def _sums(qf: jax.Array, kf: jax.Array, v: jax.Array, seg: jax.Array, scale: jax.Array | None,
          axis_name: str, *, chunk: int, strict: bool, reverse: bool = False
          ) -> tuple[jax.Array, jax.Array]:
  """The causal (reverse: anti-causal, on the flipped block) sums of `linear` over the whole
  sequence at this block's queries: the block's chunked prefix sums (`linear._prefix_from`, XLA)
  started from the state carried from the previous devices (the next ones, reverse).

  Args:
    qf: [B, n, K, G, M], kf: [B, n, K, M], v: [B, n, K, H], seg: [B, n], in the pass's order
      (flipped when reverse).
    scale: None, or the running key log-scale [B, n, K] over the whole sequence (causal FAVOR+).
    axis_name: the mesh axis.
    chunk, strict: as `linear._prefix`.
    reverse: the devices after this one carry the state (the anti-causal pass).
  Returns:
    num [B, n, K, G, H], den [B, n, K, G] float32, times exp(-scale) of each query.
  """
  log = jnp.zeros_like(kf[..., 0]) if scale is None else scale  # zeros_like: varying over the axis
  carry, has = _exclusive_scan(_block_run(kf, v, seg, log), axis_name, reverse=reverse)
  # The first device starts from no run (open_id -2, as linear's empty carry); without a key
  # scale the carry's is the constant zeros _prefix_from keeps (not varying over the axis).
  start = linear.Carry(carry.s, carry.z, jnp.where(has, carry.open_id, -2),
                       jnp.zeros(carry.scale.shape) if scale is None else carry.scale)
  scaled = {} if scale is None else dict(key_scale=scale)
  num, den, _ = linear._prefix_from(qf, kf, v, seg, start, chunk=chunk, strict=strict,
                                    **scaled)
  return num, den


def _kernel_attend(qf: jax.Array, kf: jax.Array, v: jax.Array, *, mask: Mask, axis_name: str,
                   chunk: int, eps: float, key_scale: jax.Array | None, impl: str) -> jax.Array:
  """`linear.attend_features` on this device's block (see the module docstring).

  Args:
    qf: [B, n, N, M], kf: [B, n, K, M] features; v: [B, n, K, H].
    mask: causal flag and segment ids of the block.
    axis_name: the mesh axis.
    chunk, eps: as `linear.attend_features`.
    key_scale: None, or [B, n, K] the running key log-scale over the whole sequence (causal).
    impl: 'xla' or 'auto' (both run XLA here); 'pallas' is refused.
  Returns:
    [B, n, N, H] float32.
  """
  if mask.global_tokens is not None:
    raise errors.Error("kernel attention has no global tokens, but the mask (the batch field "
                       "'global_tokens') sets some; use longformer or bigbird.")
  kernels.check(impl)
  if impl == 'pallas':
    raise errors.Error("kernel attention under context parallelism runs in XLA (the Pallas "
                       "kernels start from no carried state); use attention_impl='xla' or 'auto'.")
  b, n, heads, _ = qf.shape
  kh = kf.shape[2]
  qf = qf.astype(jnp.float32).reshape(b, n, kh, heads // kh, -1)   # [B, n, K, G, M]
  kf, v = kf.astype(jnp.float32), v.astype(jnp.float32)
  seg = mask.q_segment_ids
  if not mask.causal and seg is None:
    s = jax.lax.psum(jnp.einsum('BSKM,BSKH->BKMH', kf, v), axis_name)
    z = jax.lax.psum(jnp.sum(kf, axis=1), axis_name)
    num = jnp.einsum('BTKGM,BKMH->BTKGH', qf, s)
    den = jnp.einsum('BTKGM,BKM->BTKG', qf, z)
  else:
    seg = jnp.zeros_like(kf[..., 0, 0], jnp.int32) if seg is None else seg
    num, den = _sums(qf, kf, v, seg, key_scale, axis_name, chunk=chunk, strict=False)
    if not mask.causal:
      flip = lambda x: jnp.flip(x, axis=1)
      back = _sums(flip(qf), flip(kf), flip(v), flip(seg), None, axis_name, chunk=chunk,
                   strict=True, reverse=True)
      num, den = num + flip(back[0]), den + flip(back[1])
  return linear._ratio(num, den, eps).reshape(b, n, heads, -1)


def linear_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: str,
                  feature_map: str = 'elu', chunk: int = 64, impl: str = 'xla') -> jax.Array:
  """`linear.attend` on this device's block (a prefix of the states over the devices).

  Args:
    q: [B, n, N, H], k, v: [B, n, K, H] this device's block.
    mask: causal flag and segment ids (contiguous runs) of the block.
    axis_name: the mesh axis the length is split over.
    feature_map, chunk, impl: as `linear.attend`.
  Returns:
    [B, n, N, H], the block of `linear.attend` over the whole sequence.
  """
  dense.check_shapes(q, k, v, mask)
  linear._check_chunk(chunk)
  phi = linear._feature_map(feature_map)
  out = _kernel_attend(phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32)), v, mask=mask,
                       axis_name=axis_name, chunk=chunk, eps=linear.EPS, key_scale=None, impl=impl)
  return out.astype(q.dtype)


def _global_scale(scale: jax.Array, seg: jax.Array, axis_name: str, *, causal: bool) -> jax.Array:
  """The key log-scale of `performer.key_features` over the whole sequence at this block.

  Args:
    scale: [B, n, K] the block's own running max (key_features under a causal mask).
    seg: [B, n] segment ids.
    axis_name: the mesh axis.
    causal: the running max up to each key (else the max over its whole run).
  Returns:
    [B, n, K]: the running max continued from the previous devices' (causal), or the max over
    each position's whole run, across devices.
  """
  through = jnp.all(seg == seg[:, :1], axis=1)
  last = _Run(None, None, seg[:, -1], scale[:, -1], through)
  before, has = _exclusive_scan(last, axis_name)
  first = _first_run(seg, before.open_id, has)[..., None]
  if causal:
    return jnp.where(first, jnp.maximum(scale, before.scale[:, None]), scale)
  whole = performer._run_max(scale, seg, causal=False)
  flip = lambda x: jnp.flip(x, axis=1)
  after, has = _exclusive_scan(_Run(None, None, seg[:, 0], whole[:, 0], through), axis_name,
                               reverse=True)
  end = flip(_first_run(flip(seg), after.open_id, has))[..., None]
  whole = jnp.where(first, jnp.maximum(whole, before.scale[:, None]), whole)
  return jnp.where(end, jnp.maximum(whole, after.scale[:, None]), whole)


def performer_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, axis_name: str,
                     projection: jax.Array, kernel: str = 'softmax', chunk: int = 64,
                     impl: str = 'xla') -> jax.Array:
  """`performer.attend` on this device's block: the key stabiliser's max and the states passed
  over the devices (see the module docstring); W replicated.

  Args:
    q: [B, n, N, H], k, v: [B, n, K, H] this device's block.
    mask: causal flag and segment ids (contiguous runs) of the block.
    axis_name: the mesh axis the length is split over.
    projection, kernel, chunk, impl: as `performer.attend`.
  Returns:
    [B, n, N, H], the block of `performer.attend` over the whole sequence.
  """
  dense.check_shapes(q, k, v, mask)
  performer._check(q, kernel, projection)
  linear._check_chunk(chunk)
  qf = performer.query_features(q, projection, kernel=kernel)
  seg = mask.kv_segment_ids
  seg = jnp.zeros_like(k[..., 0, 0], jnp.int32) if seg is None else seg
  kf, scale = performer.key_features(k, projection, kernel=kernel,
                                     mask=Mask.from_segments(seg, causal=True))
  if scale is not None:   # Softmax features: rescaled from the block's max to the sequence's.
    whole = _global_scale(scale, seg, axis_name, causal=mask.causal)
    kf = kf * jnp.exp(scale - whole)[..., None]
    scale = whole if mask.causal else None
  out = _kernel_attend(qf, kf, v, mask=mask, axis_name=axis_name, chunk=chunk,
                       eps=performer._eps(kernel), key_scale=scale, impl=impl)
  return out.astype(q.dtype)

