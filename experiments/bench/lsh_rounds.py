"""LSH attention, this tree against an older revision, interleaved in one process (issue 19).

One attention layer with its projections (efflong.nn.attention.Attention: batch 1, 4 heads, head
dim 64, d_model 256, float32), jax.jit(jax.grad) of sum(out * cotangent) with respect to the input
and every parameter; family 'lsh', causal, bucket_size 64, the other hyper-parameters at their
defaults (the band form, allow_duplicates=False). The old lsh.py is loaded from
`git show <rev>:efflong/attention/lsh.py` into a temporary module and bound into a second layer
with the same parameters; calls alternate old, new, old, new, ... and the medians are reported
with their paired ratio (old / new), the round scaling (n_hashes=4 time / n_hashes=1 time) and the
length scaling (longest T / shortest). Besides wall time: the process's user and system CPU time
and its minor page faults per call (each call's XLA temporaries are memory touched afresh: at
T = 16K and 4 rounds, 300K faults, a quarter of the CPU time in the kernel). On the shared 2-core
machine the wall time swings with the other processes' load (HEAD against itself: old / new 0.80
at T = 16K, 4 rounds) where the CPU time does not (0.99); by CPU time 16K / 4K is 3.9-4.0x and 4
rounds / 1 round 2.7x (2026-12-01, issue 19). --old_options / --new_options compile a side with
XLA compiler options, e.g. the same revision with the dots outside YNNPACK:
  ./launch.sh bench lsh_rounds --rev=HEAD --lengths=16384 --rounds=4 \
      --new_options=xla_cpu_experimental_ynn_fusion_type=

Command (about 2 minutes at the defaults):
  ./launch.sh bench lsh_rounds --rev=HEAD --lengths=4096,16384 --rounds=1,4 --reps=5
Prints a markdown table.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import resource
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
_OLD_OPTIONS = flags.DEFINE_list('old_options', [], 'XLA compiler options name=value of the old '
                                 'side (e.g. xla_cpu_experimental_ynn_fusion_type=).')
_NEW_OPTIONS = flags.DEFINE_list('new_options', [], 'The same for the new side.')


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


def _usage() -> np.ndarray:
  """This process's (user CPU ms, system CPU ms, minor page faults) so far."""
  use = resource.getrusage(resource.RUSAGE_SELF)
  return np.asarray([use.ru_utime * 1e3, use.ru_stime * 1e3, use.ru_minflt])


def timed(fn, *args) -> np.ndarray:
  """(wall ms, user CPU ms, system CPU ms, minor page faults) of one call."""
  start, before = time.perf_counter(), _usage()
  jax.block_until_ready(fn(*args))
  return np.concatenate([[(time.perf_counter() - start) * 1e3], _usage() - before])


def options(items: list[str]) -> dict[str, str] | None:
  """['name=value', ...] -> XLA compiler options (None: the defaults)."""
  return dict(item.split('=', 1) for item in items) or None


def main(argv):
  del argv
  old = old_module(_REV.value)
  lines = benchlib.header(str(jax.devices()[0])) + [
      f'- old: lsh.py at {_REV.value}; new: this tree. Medians of {_REPS.value} interleaved calls; '
      'wall time, and the process\'s CPU time (user + system: steadier on a shared machine), its '
      f'system part and its page faults. XLA options: old {_OLD_OPTIONS.value or "none"}, new '
      f'{_NEW_OPTIONS.value or "none"}.', '',
      '| T | rounds | old ms | new ms | old / new | old CPU ms | new CPU ms | old / new (CPU) | '
      'old / new system ms | old / new faults |',
      '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
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
      chosen = {'new': _NEW_OPTIONS.value, 'old': _OLD_OPTIONS.value}
      fns = {name: fn.lower(params, x, cot).compile(compiler_options=options(chosen[name]))
             for name, fn in fns.items()}
      for fn in fns.values():
        jax.block_until_ready(fn(params, x, cot))                       # Warm-up.
      times = {name: [] for name in fns}
      for _ in range(_REPS.value):
        for name, fn in fns.items():
          times[name].append(timed(fn, params, x, cot))
      med = medians[t, r] = {name: np.median(np.asarray(v), axis=0) for name, v in times.items()}
      (wall_o, *cpu_o, faults_o), (wall_n, *cpu_n, faults_n) = med['old'], med['new']
      lines.append(f'| {t} | {r} | {wall_o:.0f} | {wall_n:.0f} | {wall_o / wall_n:.2f} | '
                   f'{sum(cpu_o):.0f} | {sum(cpu_n):.0f} | {sum(cpu_o) / sum(cpu_n):.2f} | '
                   f'{cpu_o[1]:.0f} / {cpu_n[1]:.0f} | {faults_o:.0f} / {faults_n:.0f} |')
      print(lines[-1], file=sys.stderr, flush=True)
  lengths, rounds = sorted(map(int, _LENGTHS.value)), sorted(map(int, _ROUNDS.value))
  scalings = [(f'Round scaling ({rounds[-1]} rounds / {rounds[0]} round', 'T', lengths,
               lambda t: ((t, rounds[-1]), (t, rounds[0])))] if len(rounds) > 1 else []
  if len(lengths) > 1:
    scalings.append((f'Length scaling (T = {lengths[-1]} / T = {lengths[0]}', 'rounds', rounds,
                     lambda r: ((lengths[-1], r), (lengths[0], r))))
  for title, what, values, keys in scalings:
    lines += ['', f'{title}; wall, CPU):', '']
    for value in values:
      big, small = keys(value)
      scale = {name: (medians[big][name][0] / medians[small][name][0],
                      medians[big][name][1:3].sum() / medians[small][name][1:3].sum())
               for name in ('old', 'new')}
      lines.append(f'- {what} = {value}: old {scale["old"][0]:.2f}x, {scale["old"][1]:.2f}x; new '
                   f'{scale["new"][0]:.2f}x, {scale["new"][1]:.2f}x')
  benchlib.emit(None, lines, [])


if __name__ == '__main__':
  app.run(main)
