"""Speed of the Pallas kernels (efflong.kernels) against XLA: TFLOP/s, forward and forward+backward.

For every pattern, length T, head dim H and masking direction it jits the forward (out) and the
forward+backward (jax.grad of sum(out * cotangent) w.r.t. q, k, v) of each implementation and
reports the median of --repeats timed calls after one warm-up (wall clock, block_until_ready).

Shapes follow the FlashAttention papers: 16K tokens per batch (B = 16384 / T, at least 1) and
N = 2048 / H heads, bfloat16 inputs. Implementations:
  pallas      the family with attention_impl='pallas' (the kernels)
  xla         the family's own XLA path (its twin; for dense the explicit T x S softmax)
  jax-xla     jax.nn.dot_product_attention(implementation='xla')      (dense only)
  jax-cudnn   jax.nn.dot_product_attention(implementation='cudnn')    (dense only; GPU only)
FLOPs count the tiles a layout visits: 4 B N T S H x density forward (density 1, or about 1/2
causal, for dense), 2.5x that again for the backward (FlashAttention-2's convention). Sparse
patterns also report `vs ideal`: their time over (their density / dense density) x the dense
Pallas time at the same T, H and direction; 1.0 means no overhead over skipping perfectly.
The linear pattern (causal kernel attention, elu features) reports its speed-up over the XLA scan.
`matmul peak` is a bf16 8192^3 jnp.dot on the same device.

Goals on an H100 (issue 7): dense causal forward >= 60% of the matmul peak at T = 16K, H = 128, and
no slower than cuDNN; local window 1K at T = 64K within 1.3x of ideal; linear >= 5x the scan at 16K.

Command:
  ./launch.sh bench kernels [--patterns=dense,local,strided,bigbird,lsh,linear]
      [--lengths=1024,2048,4096,8192,16384,32768] [--head_dims=64,128] [--directions=causal,full]
      [--dtype=bfloat16] [--tokens=16384] [--width=2048] [--repeats=5]
      [--out=experiments/results/kernels]
Off the GPU the kernels run in Pallas' interpreter: the numbers then say nothing about kernel speed;
use tiny --lengths and --tokens (experiments/results/kernels_cpu.md was made that way).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import app, flags

import benchlib
from efflong.attention import Mask, bigbird, blocksparse, dense, linear, local, lsh, sparse

# Pattern -> (its family's attend, which takes impl; the hyper-parameters timed).
_PATTERNS: dict[str, tuple[Callable, dict[str, Any]]] = {
    'dense': (dense.attend, {}),
    'local': (local.attend, {'window': 1024, 'block': 128}),
    'strided': (sparse.strided, {'stride': 128, 'block': 128}),
    'bigbird': (bigbird.attend, {'window': 1, 'random_blocks': 3, 'block': 128}),
    'lsh': (lsh.attend, {'n_hashes': 4, 'bucket_size': 128, 'rng': jax.random.key(0)}),
    'linear': (linear.attend, {}),
}

_PATTERN_NAMES = flags.DEFINE_list('patterns', list(_PATTERNS), 'Patterns to time.')
_LENGTHS = flags.DEFINE_list('lengths', ['1024', '2048', '4096', '8192', '16384', '32768'], 'T.')
_HEAD_DIMS = flags.DEFINE_list('head_dims', ['64', '128'], 'H.')
_DIRECTIONS = flags.DEFINE_list('directions', ['causal', 'full'], 'causal and/or full.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'q, k, v dtype.')
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'B * T: B = tokens // T (at least 1).')
_WIDTH = flags.DEFINE_integer('width', 2048, 'N * H: N = width // H.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per row (median).')
_OUT = flags.DEFINE_string('out', None, 'Write <out>.md and <out>.json.')


def _median_ms(fn: Callable, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _matmul_peak() -> float:
  """TFLOP/s of a bf16 8192^3 matmul (2 n^3 flops)."""
  n = 8192 if jax.default_backend() == 'gpu' else 1024
  a = jnp.ones((n, n), jnp.bfloat16)
  return 2 * n ** 3 / _median_ms(jax.jit(jnp.dot), a, a) / 1e9


def _attend(pattern: str, impl: str, causal: bool) -> Callable:
  """(q, k, v) -> out for one implementation."""
  if impl.startswith('jax-'):
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation=impl[4:])
  fn, kw = _PATTERNS[pattern]
  return functools.partial(fn, mask=Mask(causal=causal), impl=impl, **kw)


def _density(pattern: str, t: int, causal: bool) -> float:
  """Fraction of the T x T tiles the kernel visits (dense: the causal tiles, or 1; linear: 0)."""
  if pattern == 'dense':
    return blocksparse.dense_layout(t, t, causal=causal, block=128).density(t, t)
  kw = _PATTERNS[pattern][1]
  if pattern == 'local':
    layouts = [local.band_layout(t, t, window=kw['window'], dilation=1, causal=causal, heads=1,
                                 block=kw['block'])]
  elif pattern == 'strided':
    layouts = sparse.strided_layouts(t, stride=kw['stride'], causal=causal, block=kw['block'])
  elif pattern == 'bigbird':
    layouts = [bigbird.random_layout(t, heads=1, block=kw['block'], window=kw['window'],
                                     random_blocks=kw['random_blocks'], causal=causal, seed=0)]
  elif pattern == 'lsh':  # Each round: a chunk and the one before it.
    return kw['n_hashes'] * 2 * kw['bucket_size'] / t
  else:  # linear: no tiles
    return 0.0
  return sum(lay.density(t, t) for lay in layouts)


def _row(pattern: str, impl: str, t: int, h: int, causal: bool, dtype) -> list[dict[str, Any]]:
  b, n = max(1, _TOKENS.value // t), max(1, _WIDTH.value // h)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(key, (b, t, n, h), dtype) for key in keys)
  if pattern == 'lsh':
    k = q
  fn = _attend(pattern, impl, causal)
  forward = jax.jit(fn)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
  both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  density = _density(pattern, t, causal)
  flops = 4 * b * n * t * t * h * density
  rows = []
  for direction, f, mult in (('fwd', forward, 1.0), ('fwd+bwd', both, 3.5)):
    row = dict(pattern=pattern, impl=impl, T=t, H=h, B=b, N=n, mask='causal' if causal else 'full',
               pass_=direction, density=round(float(density), 4))
    try:
      ms = _median_ms(f, q, k, v)
      row.update(ms=round(ms, 3), tflops=round(float(mult * flops / ms / 1e9), 3))
    except Exception as e:  # pylint: disable=broad-except  (recorded: cuDNN off the GPU, OOM, ...)
      row['status'] = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    rows.append(row)
  return rows


def _impls(pattern: str) -> list[str]:
  if pattern != 'dense':
    return ['pallas', 'xla']
  return ['pallas', 'xla', 'jax-xla'] + (['jax-cudnn'] if jax.default_backend() == 'gpu' else [])


def _table(rows: list[dict[str, Any]]) -> list[str]:
  """Markdown rows, with vs-ideal for sparse patterns and the linear speed-up over the scan."""
  def find(**kv):
    return next((r for r in rows if all(r.get(key) == val for key, val in kv.items())
                 and 'ms' in r), None)
  out = ['| pattern | impl | mask | pass | T | H | B x N | ms | TFLOP/s | density | vs ideal / '
         'speed-up |', '|' + '---|' * 11]
  for r in rows:
    note = ''
    same = dict(T=r['T'], H=r['H'], mask=r['mask'], pass_=r['pass_'])
    dense_row = find(pattern='dense', impl='pallas', **same)
    if 'ms' in r and r['pattern'] not in ('dense', 'linear') and dense_row:
      ideal = r['density'] / dense_row['density'] * dense_row['ms']
      note = f'{r["ms"] / ideal:.2f}x ideal'
    if 'ms' in r and r['pattern'] == 'linear' and r['impl'] == 'pallas':
      scan = find(pattern='linear', impl='xla', **same)
      note = f'{scan["ms"] / r["ms"]:.1f}x the scan' if scan else ''
    ms = r.get('ms', r.get('status', ''))
    tflops = '' if r['pattern'] == 'linear' else r.get('tflops', '')
    density = '' if r['pattern'] == 'linear' else r['density']
    out.append(f'| {r["pattern"]} | {r["impl"]} | {r["mask"]} | {r["pass_"]} | {r["T"]} | '
               f'{r["H"]} | {r["B"]} x {r["N"]} | {ms} | {tflops} | {density} | {note} |')
  return out


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()})'
  interpreted = jax.default_backend() != 'gpu'
  rows = []
  for pattern in _PATTERN_NAMES.value:
    if pattern not in _PATTERNS:
      raise app.UsageError(f'--patterns: unknown {pattern!r}; valid: {sorted(_PATTERNS)}.')
    for t in map(int, _LENGTHS.value):
      for h in map(int, _HEAD_DIMS.value):
        for direction in _DIRECTIONS.value:
          causal = direction == 'causal'
          if pattern == 'linear' and not causal:
            continue  # The kernel is the causal prefix sum; full linear attention is one matmul.
          for impl in _impls(pattern):
            rows += _row(pattern, impl, t, h, causal, dtype)
            print(rows[-2], rows[-1], flush=True)
  text = '\n'.join(
      ['# Pallas kernels vs XLA', '', *benchlib.header(device),
       f'- matmul peak (bf16): {_matmul_peak():.1f} TFLOP/s', f'- dtype: {_DTYPE.value}',
       *(['- **interpreted**: off the GPU the kernels run in the Pallas interpreter; these '
          'numbers check that the benchmark runs, not kernel speed.'] if interpreted else []),
       '', *_table(rows), ''])
  print(text)
  if _OUT.value:
    benchlib.write(_OUT.value, text, rows)


if __name__ == '__main__':
  app.run(main)
