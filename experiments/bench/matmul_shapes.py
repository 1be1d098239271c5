"""The primitives under the peer benchmark's layers, JAX (XLA:CPU) against PyTorch (issue 19).

Command:
  ./launch.sh bench matmul_shapes [--reps 15] [--out experiments/results/matmul_shapes_cpu]

Each case is one jitted JAX function and its PyTorch twin on the same float32 shapes (the matmuls
that the projections, their gradients and the blocked attention paths run at T = 16384, B 1,
N 4, H 64, D 256; exp over the logits of a block), timed interleaved in one process (.peers/venv,
made by experiments/bench/peers.py, with its heap settings): the median wall ms of --reps calls
each, GFLOP/s for the matmuls and the ratio torch / JAX (> 1: JAX is faster). Writes <out>.md and
<out>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import peers

# name -> (einsum, operand shapes, the flops of one call or None for an elementwise case)
_CASES = {
    'projection x W [16K, 256] x [256, 256]': ('td,de->te', ((16384, 256), (256, 256))),
    'input gradient dq W^T [16K, 256] x [256, 256]^T': ('te,de->td', ((16384, 256), (256, 256))),
    'weight gradient x^T dq [16K, 256]^T x [16K, 256]': ('td,te->de', ((16384, 256), (16384, 256))),
    'logit block [4, 256, 64] x [4, 64, 256]': ('nqh,nhk->nqk', ((4, 256, 64), (4, 64, 256))),
    'value block [4, 256, 256] x [4, 256, 64]': ('nqk,nkh->nqh', ((4, 256, 256), (4, 256, 64))),
    'key gradient block p^T ds [4, 256, 256]^T x [4, 256, 64]':
        ('nqk,nqh->nkh', ((4, 256, 256), (4, 256, 64))),
    'whole-length logits [4, 16K, 64] x [4, 64, 256]':
        ('nqh,nhk->nqk', ((4, 16384, 64), (4, 64, 256))),
    'exp of a logit block x 64 [64, 4, 256, 256]': (None, ((64, 4, 256, 256),)),
}


def flops(spec: str | None, shapes: tuple[tuple[int, ...], ...]) -> float | None:
  """2 x the product of every distinct index's size, for an einsum of two operands."""
  if spec is None:
    return None
  sizes = {}
  for letters, shape in zip(spec.split('->')[0].split(','), shapes, strict=True):
    sizes.update(zip(letters, shape))
  total = 2.0
  for size in sizes.values():
    total *= size
  return total


def callables(spec: str | None, shapes) -> tuple[Callable[[], Any], Callable[[], Any]]:
  """The JAX call (jitted, blocking) and the torch call of one case."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  arrays = [np.random.default_rng(i).standard_normal(s, np.float32) for i, s in enumerate(shapes)]
  j_args, t_args = [jnp.asarray(a) for a in arrays], [torch.from_numpy(a) for a in arrays]
  if spec is None:
    j_fn, t_fn = jax.jit(jnp.exp), torch.exp
  else:
    j_fn, t_fn = jax.jit(lambda *a: jnp.einsum(spec, *a)), lambda *a: torch.einsum(spec, *a)
  return lambda: jax.block_until_ready(j_fn(*j_args)), lambda: t_fn(*t_args)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reps', type=int, default=15)
  parser.add_argument('--out', default='experiments/results/matmul_shapes_cpu')
  args = parser.parse_args()
  peers.ensure_env()
  import benchlib
  import torch
  peers._use_all_cores()
  rows = []
  for name, (spec, shapes) in _CASES.items():
    calls = callables(spec, shapes)
    times: list[list[float]] = [[], []]
    for call in calls:
      call()
    for _ in range(args.reps):
      for side, call in enumerate(calls):
        start = time.perf_counter()
        call()
        times[side].append((time.perf_counter() - start) * 1e3)
    jax_ms, torch_ms = (statistics.median(t) for t in times)
    work = flops(spec, shapes)
    rows.append({'case': name, 'jax_ms': jax_ms, 'torch_ms': torch_ms,
                 'jax_gflops': work and work / jax_ms / 1e6,
                 'torch_gflops': work and work / torch_ms / 1e6,
                 'torch_over_jax': torch_ms / jax_ms})
  gf = lambda v: '—' if v is None else f'{v:.0f}'
  lines = ['# JAX (XLA:CPU) and PyTorch on the primitives of the peer benchmark (issue 19)', '',
           *benchlib.header('CPU'), f'- torch {torch.__version__}, {torch.get_num_threads()} '
           'threads; heap ' + ' '.join(f'{k}={v}' for k, v in peers._HEAP.items()), '',
           '| case | JAX ms | torch ms | JAX GFLOP/s | torch GFLOP/s | torch / JAX |',
           '|---|---:|---:|---:|---:|---:|']
  lines += [f"| {r['case']} | {r['jax_ms']:.2f} | {r['torch_ms']:.2f} | {gf(r['jax_gflops'])} | "
            f"{gf(r['torch_gflops'])} | {r['torch_over_jax']:.2f} |" for r in rows]
  benchlib.emit(args.out, lines, rows)


if __name__ == '__main__':
  sys.exit(main())
