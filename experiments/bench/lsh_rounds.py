"""LSH attention, this tree against an older revision, interleaved in one process (issue 19).

One attention layer with its projections (efflong.nn.attention.Attention: batch 1, 4 heads, head
dim 64, d_model 256, float32), jax.jit(jax.grad) of sum(out * cotangent) with respect to the input
and every parameter; family 'lsh', causal, bucket_size 64, the other hyper-parameters at their
defaults (the band form, allow_duplicates=False). The old lsh.py is loaded from
`git show <rev>:efflong/attention/lsh.py` into a temporary module and bound into a second layer
with the same parameters; calls alternate old, new, old, new, ... and the medians are reported
with their paired ratio (old / new) and the round scaling (n_hashes=4 time / n_hashes=1 time).

Command (about 2 minutes at the defaults):
  ./launch.sh bench lsh_rounds --rev=HEAD --lengths=4096,16384 --rounds=1,4 --reps=5
Prints a markdown table.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import benchlib
from efflong.nn.attention import Attention

_REV = flags.DEFINE_string('rev', 'HEAD', 'The revision whose lsh.py is "old".')
_LENGTHS = flags.DEFINE_list('lengths', ['4096', '16384'], 'Sequence lengths T.')
_ROUNDS = flags.DEFINE_list('rounds', ['1', '4'], 'Hash rounds (n_hashes).')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls per variant (after one warm-up).')


def old_module(rev: str):
  """efflong/attention/lsh.py at rev, imported as a fresh module."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  text = subprocess.run(['git', 'show', f'{rev}:efflong/attention/lsh.py'], cwd=root, check=True,
                        capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), 'lsh_old.py')
  with open(path, 'w') as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location('lsh_old', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def timed(fn, *args) -> tuple[float, float]:
  """(wall ms, this process's CPU ms) of one call."""
  start, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3


def main(argv):
  del argv
  old = old_module(_REV.value)
  lines = benchlib.header(str(jax.devices()[0])) + [
      f'- old: lsh.py at {_REV.value}; new: this tree. Medians of {_REPS.value} interleaved calls; '
      'wall time, and the process\'s CPU time (steadier on a shared machine).', '',
      '| T | rounds | old ms | new ms | old / new | old CPU ms | new CPU ms | old / new (CPU) |',
      '|---:|---:|---:|---:|---:|---:|---:|---:|']
  medians = {}
  for t in map(int, _LENGTHS.value):
    x, cot = (jax.random.normal(jax.random.key(i), (1, t, 256)) for i in (1, 2))
    for r in map(int, _ROUNDS.value):
      layer = Attention(256, 4, 64, family='lsh', family_kw=dict(n_hashes=r, bucket_size=64),
                        causal=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
      fns = {'new': benchlib.layer_grad(layer)}
      layer.attend = functools.partial(old.attend, **layer.attend.keywords)
      fns['old'] = benchlib.layer_grad(layer)
      _, params, _ = nnx.split(layer, nnx.Param, ...)
      for fn in fns.values():
        jax.block_until_ready(fn(params, x, cot))                       # Compiles.
      times = {name: [] for name in fns}
      for _ in range(_REPS.value):
        for name, fn in fns.items():
          times[name].append(timed(fn, params, x, cot))
      med = medians[t, r] = {name: np.median(np.asarray(v), axis=0) for name, v in times.items()}
      (wo, co), (wn, cn) = med['old'], med['new']
      lines.append(f'| {t} | {r} | {wo:.0f} | {wn:.0f} | {wo / wn:.2f} | {co:.0f} | {cn:.0f} | '
                   f'{co / cn:.2f} |')
      print(lines[-1], file=sys.stderr, flush=True)
  rounds = sorted(map(int, _ROUNDS.value))
  if len(rounds) > 1:
    lines += ['', f'Round scaling ({rounds[-1]} rounds / {rounds[0]} round; wall, CPU):', '']
    for t in map(int, _LENGTHS.value):
      scale = {name: medians[t, rounds[-1]][name] / medians[t, rounds[0]][name]
               for name in ('old', 'new')}
      lines.append(f'- T = {t}: old {scale["old"][0]:.2f}x, {scale["old"][1]:.2f}x; new '
                   f'{scale["new"][0]:.2f}x, {scale["new"][1]:.2f}x')
  benchlib.emit(None, lines, [])


if __name__ == '__main__':
  app.run(main)
