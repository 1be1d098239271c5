"""Chunked causal linear attention in Pallas: a forward kernel and a backward of two kernels.

What it computes: the causal numerator and denominator of kernel attention (Katharopoulos et al.
2020, "Transformers are RNNs", Sec. 3.3: the causal case as prefix sums),

  num_i = sum_{j in A(i)} (qf_i . kf_j) v_j,   den_i = sum_{j in A(i)} qf_i . kf_j,

A(i) the keys j <= i (j < i if strict) in the contiguous segment run of i; `prefix` equals its XLA
twin `efflong.attention.linear._prefix` (same arguments, same outputs), which
`linear.attend_features(impl=...)` switches to it.

Forward, grid (B, N): one program per query head walks the chunks of C tokens in order
(`lax.fori_loop`), carrying on chip S = sum kf v^T [M, H], z = sum kf [1, M] and the id [1, 1] of
the run open at the chunk's end; inside a chunk the C x C kernel matrix is masked directly (same
run and causal order), and a query adds qf^T S, qf^T z when it is in the carried run. The kv heads
are read at n // G (grouped-query attention). On several devices each call runs on the device's own
batch rows (`kernels.batch_sharded`).

Backward (no autodiff through the forward kernel). With the cotangents dnum [T, H], dden [T] of one
head and w_ij = dnum_i . v_j + dden_i for j in A(i):

  dqf_i = sum_{j in A(i)} w_ij kf_j: `_dq_kernel`, grid (B, N), the forward's in-order scan with
    the same carry; the carried keys add S dnum_i + dden_i z.
  dkf_j = sum_{i: j in A(i)} w_ij qf_i,  dv_j = sum_{i: j in A(i)} (qf_i . kf_j) dnum_i:
    `_dkv_kernel`, grid (B, K), a reverse scan (last chunk first) carrying U = sum_i qf_i dnum_i^T
    [M, H] and r = sum_i dden_i qf_i [1, M] over the queries already passed that are in the run open
    at the chunk's end (which continues backwards); the carried queries add U v_j + r to dkf_j and
    U^T kf_j to dv_j. In the chunk, the forward's query x key mask is used transposed (key j gets
    the queries i >= j, i > j when strict). Each program loops over the G query heads of its kv
    head and sums their terms and carries on chip, so dkf, dv are written once, by one program.

Blocks and padding: every tile is 2-D, [C, lanes], loaded with a dynamic `ref[pl.ds(c * C, C), :]`;
the segment ids come in two layouts, a column [Tp, 1] and a row [1, Tp], so that the C x C mask
needs no in-kernel transpose. The sizes the GPU (Triton) lowering takes are powers of two (it
checks every load and store), so C = the requested chunk rounded up to a power of two, at least 16,
and M, H are zero-padded to a power of two, at least 64 (so 64 or a multiple of 128); T is padded
to a multiple of C with segment id -1, a run of its own. Zero padding and the choice of C leave the
results unchanged. Tiles are computed in float32 (the callers pass float32 features); the matmuls
are `kernels.dot` (float32 products, not TF32). The kernels were run in interpret mode on the CPU
and lowered to Triton for CUDA (tests/kernels/test_lowering.py), never run on a GPU.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from efflong import errors, kernels

MIN_CHUNK = 16   # C: the smallest tile length (matmul tiles on the GPU are at least 16).
MIN_LANES = 64   # M and H are padded to a power of two at least this.
NO_RUN = -2      # The open run id before the first chunk: the carry is empty, whatever matches it.

# (s, z, open run id) with shapes [M, H], [1, M], [1, 1] (U, r, id in the reverse scan).
Carry = tuple[jax.Array, jax.Array, jax.Array]


def _load(ref, rows: pl.Slice, lanes: pl.Slice | None = None) -> jax.Array:
  """A [C, lanes] tile as float32."""
  return ref[rows, slice(None) if lanes is None else lanes].astype(jnp.float32)


def _pairs(segc_ref, segr_ref, rows: pl.Slice, size: int, strict: bool
           ) -> tuple[jax.Array, jax.Array]:
  """The in-chunk mask [C, C] (query x key: same run, key not after query) and the ids [C, 1]."""
  seg = segc_ref[rows, :]                                           # [C, 1]
  query = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
  key = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
  order = key < query if strict else key <= query
  return (seg == segr_ref[:, rows]) & order, seg


def _advance(carry: Carry, run: jax.Array, ds: jax.Array, dz: jax.Array) -> Carry:
  """The carry of run [1, 1]: the old sums if run is the open one, plus this chunk's (ds, dz)."""
  s, z, open_id = carry
  keep = (run == open_id).astype(jnp.float32)                       # [1, 1]
  return s * keep + ds, z * keep + dz, run


def _scan_keys(size: int, strict: bool, k_ref, v_ref, segc_ref, segr_ref,
               emit: Callable[..., None]) -> None:
  """Walks the chunks in order with the carry S = sum kf v^T, z = sum kf of the open run.

  For each chunk, emit(rows, k [C, M], v [C, H], same [C, C], from_carry [C, 1], s, z) writes the
  chunk's outputs; from_carry is 1 on the queries in the carried run.
  """
  m, h = k_ref.shape[1], v_ref.shape[1]

  def body(c, carry: Carry) -> Carry:
    s, z, open_id = carry
    rows = pl.ds(c * size, size)
    k, v = _load(k_ref, rows), _load(v_ref, rows)
    same, seg = _pairs(segc_ref, segr_ref, rows, size, strict)
    emit(rows, k, v, same, (seg == open_id).astype(jnp.float32), s, z)
    last = segr_ref[:, pl.ds(c * size + size - 1, 1)]               # [1, 1]: open at the end
    in_last = (seg == last).astype(jnp.float32)                     # [C, 1]
    return _advance(carry, last, kernels.dot(k, v * in_last, (0, 0)),
                    jnp.sum(k * in_last, axis=0, keepdims=True))

  init = (jnp.zeros((m, h), jnp.float32), jnp.zeros((1, m), jnp.float32),
          jnp.full((1, 1), NO_RUN, jnp.int32))
  jax.lax.fori_loop(0, k_ref.shape[0] // size, body, init)


def _forward_kernel(size: int, strict: bool, q_ref, k_ref, v_ref, segc_ref, segr_ref, num_ref,
                    den_ref) -> None:
  """Grid (B, N): num [Tp, H] and den [Tp, 1] of one query head."""

  def emit(rows, k, v, same, from_carry, s, z):
    q = _load(q_ref, rows)                                          # [C, M]
    a = jnp.where(same, kernels.dot(q, k, (1, 1)), 0.0)                    # [C, C] qf_i . kf_j
    num_ref[rows, :] = kernels.dot(a, v, (1, 0)) + from_carry * kernels.dot(q, s, (1, 0))
    den_ref[rows, :] = (jnp.sum(a, axis=1, keepdims=True)
                        + from_carry * jnp.sum(q * z, axis=1, keepdims=True))

  _scan_keys(size, strict, k_ref, v_ref, segc_ref, segr_ref, emit)


def _dq_kernel(size: int, strict: bool, k_ref, v_ref, segc_ref, segr_ref, dnum_ref, dden_ref,
               dq_ref) -> None:
  """Grid (B, N): dqf [Tp, M] of one query head, the forward's scan."""

  def emit(rows, k, v, same, from_carry, s, z):
    dnum, dden = _load(dnum_ref, rows), _load(dden_ref, rows)       # [C, H], [C, 1]
    w = jnp.where(same, kernels.dot(dnum, v, (1, 1)) + dden, 0.0)          # [C, C] w_ij
    dq = kernels.dot(w, k, (1, 0)) + from_carry * (kernels.dot(dnum, s, (1, 1)) + dden * z)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)

  _scan_keys(size, strict, k_ref, v_ref, segc_ref, segr_ref, emit)


def _dkv_kernel(size: int, strict: bool, groups: int, q_ref, k_ref, v_ref, segc_ref, segr_ref,
                dnum_ref, dden_ref, dk_ref, dv_ref) -> None:
  """Grid (B, K): dkf [Tp, M] and dv [Tp, H] of one kv head, a reverse scan over the chunks.

  q_ref [Tp, G * M], dnum_ref [Tp, G * H] and dden_ref [Tp, G] hold the kv head's G query heads
  side by side; the loop over them is unrolled, and their terms add up on chip.
  """
  m, h = k_ref.shape[1], v_ref.shape[1]
  chunks = k_ref.shape[0] // size

  def body(i, carry: Carry) -> Carry:
    u, r, open_id = carry      # Sums over the later queries of the run open at the chunk's end.
    c = chunks - 1 - i
    rows = pl.ds(c * size, size)
    k, v = _load(k_ref, rows), _load(v_ref, rows)                   # [C, M], [C, H]
    same, seg = _pairs(segc_ref, segr_ref, rows, size, strict)      # same: query x key
    from_carry = (seg == open_id).astype(jnp.float32)               # [C, 1], keys here
    first = segr_ref[:, pl.ds(c * size, 1)]                         # [1, 1]: open at the start
    in_first = (seg == first).astype(jnp.float32)                   # [C, 1], queries here
    dk = from_carry * (kernels.dot(v, u, (1, 1)) + r)                      # [C, M]
    dv = from_carry * kernels.dot(k, u, (1, 0))                            # [C, H]
    du, dr = jnp.zeros((m, h), jnp.float32), jnp.zeros((1, m), jnp.float32)
    for g in range(groups):
      q = _load(q_ref, rows, pl.ds(g * m, m))                       # [C, M]
      dnum = _load(dnum_ref, rows, pl.ds(g * h, h))                 # [C, H]
      dden = _load(dden_ref, rows, pl.ds(g, 1))                     # [C, 1]
      a = jnp.where(same, kernels.dot(q, k, (1, 1)), 0.0)                  # [C, C] qf_i . kf_j
      w = jnp.where(same, kernels.dot(dnum, v, (1, 1)) + dden, 0.0)        # [C, C] w_ij
      dk = dk + kernels.dot(w, q, (0, 0))
      dv = dv + kernels.dot(a, dnum, (0, 0))
      du = du + kernels.dot(q, dnum * in_first, (0, 0))
      dr = dr + jnp.sum(q * (dden * in_first), axis=0, keepdims=True)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return _advance(carry, first, du, dr)

  init = (jnp.zeros((m, h), jnp.float32), jnp.zeros((1, m), jnp.float32),
          jnp.full((1, 1), NO_RUN, jnp.int32))
  jax.lax.fori_loop(0, chunks, body, init)


def _seg_specs(tp: int) -> list[pl.BlockSpec]:
  """The ids as a column [Tp, 1] and as a row [1, Tp]; any grid (b, head)."""
  return [pl.BlockSpec((None, tp, 1), lambda b, n: (b, 0, 0)),
          pl.BlockSpec((None, 1, tp), lambda b, n: (b, 0, 0))]


def _seg_layouts(seg: jax.Array) -> tuple[jax.Array, jax.Array]:
  return seg[:, :, None], seg[:, None, :]


def _head_spec(tp: int, width: int, head: Callable[[jax.Array], jax.Array]) -> pl.BlockSpec:
  """Block [Tp, width] of the head head(n) of a [B, Tp, heads, width] array, grid (b, n)."""
  return pl.BlockSpec((None, tp, None, width), lambda b, n: (b, 0, head(n), 0))


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, size: int, strict: bool,
             interpret: bool) -> tuple[jax.Array, jax.Array]:
  """num [B, Tp, N, H], den [B, Tp, N, 1] float32 from padded q [B, Tp, N, M], k, v, seg."""
  b, tp, n, m = q.shape
  kh, h = k.shape[2], v.shape[3]
  group = lambda i: i // (n // kh)
  own = lambda i: i
  return pl.pallas_call(
      functools.partial(_forward_kernel, size, strict),
      out_shape=(jax.ShapeDtypeStruct((b, tp, n, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, tp, n, 1), jnp.float32)),
      grid=(b, n),
      in_specs=[_head_spec(tp, m, own), _head_spec(tp, m, group), _head_spec(tp, h, group),
                *_seg_specs(tp)],
      out_specs=(_head_spec(tp, h, own), _head_spec(tp, 1, own)),
      interpret=interpret, compiler_params=kernels.triton(), name='linear_attention_fwd',
  )(q, k, v, *_seg_layouts(seg))


def _backward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, dnum: jax.Array,
              dden: jax.Array, size: int, strict: bool, interpret: bool
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dq [B, Tp, N, M], dk [B, Tp, K, M], dv [B, Tp, K, H] (the input dtypes)."""
  b, tp, n, m = q.shape
  kh, h = k.shape[2], v.shape[3]
  g = n // kh
  group = lambda i: i // g
  own = lambda i: i
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, size, strict),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(b, n),
      in_specs=[_head_spec(tp, m, group), _head_spec(tp, h, group), *_seg_specs(tp),
                _head_spec(tp, h, own), _head_spec(tp, 1, own)],
      out_specs=_head_spec(tp, m, own),
      interpret=interpret, compiler_params=kernels.triton(), name='linear_attention_dq',
  )(k, v, *_seg_layouts(seg), dnum, dden)
  # [B, Tp, N, F] -> [B, Tp, K, G * F]: a kv head's query heads side by side (a free reshape).
  side = lambda x: x.reshape(b, tp, kh, g * x.shape[-1])
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, size, strict, g),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(b, kh),
      in_specs=[_head_spec(tp, g * m, own), _head_spec(tp, m, own), _head_spec(tp, h, own),
                *_seg_specs(tp), _head_spec(tp, g * h, own), _head_spec(tp, g, own)],
      out_specs=(_head_spec(tp, m, own), _head_spec(tp, h, own)),
      interpret=interpret, compiler_params=kernels.triton(), name='linear_attention_dkv',
  )(side(q), k, v, *_seg_layouts(seg), side(dnum), side(dden))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _padded(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, size: int, strict: bool,
            interpret: bool) -> tuple[jax.Array, jax.Array]:
  """`_forward` with the kernels' backward; each device runs them on its own batch rows."""
  return _padded_fwd(q, k, v, seg, size, strict, interpret)[0]


def _padded_fwd(q, k, v, seg, size, strict, interpret):
  forward = functools.partial(_forward, size=size, strict=strict, interpret=interpret)
  return kernels.batch_sharded(forward, (q, k, v, seg), [True] * 4), (q, k, v, seg)


def _padded_bwd(size, strict, interpret, residuals, cotangents):
  backward = functools.partial(_backward, size=size, strict=strict, interpret=interpret)
  grads = kernels.batch_sharded(backward, (*residuals, *cotangents), [True] * 6)
  return (*grads, None)  # seg: integer


_padded.defvjp(_padded_fwd, _padded_bwd)


def prefix(qf: jax.Array, kf: jax.Array, v: jax.Array, seg: jax.Array, *, chunk: int,
           strict: bool, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Causal numerator and denominator: sums over keys j <= i (j < i if strict) in i's run.

  The contract of `efflong.attention.linear._prefix`; differentiable in qf, kf and v.

  Args:
    qf: [B, T, K, G, M] query features.
    kf: [B, T, K, M] key features.
    v: [B, T, K, H].
    seg: [B, T] int segment ids, in contiguous runs.
    chunk: the requested chunk; the kernels use C = chunk rounded up to a power of two, at least 16
      (the results do not depend on C).
    strict: leave out j == i.
    interpret: run the kernels in Pallas' interpreter; None: everywhere but the GPU.
  Returns:
    num [B, T, K, G, H] and den [B, T, K, G], float32.
  """
  if not isinstance(chunk, int) or chunk < 1:
    raise errors.Error(f'chunk={chunk!r} must be a positive integer.')
  b, t, kh, g, m = qf.shape
  h = v.shape[-1]
  size = kernels.pow2(chunk, MIN_CHUNK)
  tp = -(-t // size) * size
  mp, hp = kernels.pow2(m, MIN_LANES), kernels.pow2(h, MIN_LANES)
  pad = lambda x, width: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, width - x.shape[-1])))
  seg = jnp.pad(seg.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
  num, den = _padded(pad(qf.reshape(b, t, kh * g, m), mp), pad(kf, mp), pad(v, hp), seg, size,
                     strict, kernels.interpret() if interpret is None else interpret)
  return num[:, :t, :, :h].reshape(b, t, kh, g, h), den[:, :t, :, 0].reshape(b, t, kh, g)
