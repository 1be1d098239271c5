"""Kernel-attention families, this tree against an older revision, interleaved in one process.

Issue 19's measure: one attention layer with its projections (efflong.nn.attention.Attention:
batch 1, 4 heads, head dim 64, d_model 256, float32), jax.jit(jax.grad) of sum(out * cotangent)
with respect to the input and every parameter, for linear (bidirectional and causal), performer
(256 features, bidirectional and causal) and linformer (k = 256). The old linear.py, performer.py
and linformer.py are loaded from `git show <rev>:...` into temporary modules (the old performer
on the old linear) and bound into a second layer with the same parameters. A third layer, 'proj',
replaces the family by q * k * v: the projections alone (four [T, 256] x [256, 256] matmuls,
forward and backward, and one elementwise pass), the floor under every family. (Not q + k + v:
q, k and v would then get one gradient, and XLA computes their three weight gradients as one.)
Each round calls old, new and proj once, in a shuffled order (in the fixed order new, old, proj,
identical code measured old / new 0.93 at T = 16K; shuffled, 1.00); the medians are reported with the paired ratio old / new (the median of the per-round ratios, robust
to a machine shared with other work) and new / proj.

Command (a few minutes on an idle 2-core CPU at the defaults; fewer --families, --lengths: less):
  ./launch.sh bench kernel_families --rev=fd12603~1 --lengths=4096,16384 --reps=5
      [--families=linear,linear-causal,performer,performer-causal,linformer]
Prints a markdown table.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import benchlib
from efflong.nn.attention import Attention

# name -> (family, family_kw, causal).
_FAMILIES: dict[str, tuple[str, dict[str, Any], bool]] = {
    'linear': ('linear', {}, False),
    'linear-causal': ('linear', {}, True),
    'performer': ('performer', {'nb_features': 256}, False),
    'performer-causal': ('performer', {'nb_features': 256}, True),
    'linformer': ('linformer', {'k': 256}, False),
}
_MODULES = ('linear', 'performer', 'linformer')

_REV = flags.DEFINE_string('rev', 'fd12603~1', 'The revision whose kernel-family modules are '
                           '"old" (default: before the fused path, issue 19).')
_LENGTHS = flags.DEFINE_list('lengths', ['4096', '16384'], 'Sequence lengths T.')
_NAMES = flags.DEFINE_list('families', list(_FAMILIES), 'Entries of the table to measure.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed rounds (after one warm-up call each).')


def old_modules(rev: str) -> dict[str, Any]:
  """efflong/attention/{linear,performer,linformer}.py at rev, imported as fresh modules."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  folder, modules = tempfile.mkdtemp(), {}
  for name in _MODULES:
    text = subprocess.run(['git', 'show', f'{rev}:efflong/attention/{name}.py'], cwd=root,
                          check=True, capture_output=True, text=True).stdout
    path = os.path.join(folder, f'{name}_old.py')
    with open(path, 'w') as f:
      f.write(text)
    spec = importlib.util.spec_from_file_location(f'{name}_old', path)
    modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[name])
  modules['performer'].linear = modules['linear']   # The old performer on the old core.
  return modules


def _projections_only(q: jax.Array, k: jax.Array, v: jax.Array, **unused: Any) -> jax.Array:
  del unused
  return q * k * v


shuffle = random.Random(0).shuffle


def timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) * 1e3


def main(argv):
  del argv
  old = old_modules(_REV.value)
  lines = benchlib.header(str(jax.devices()[0])) + [
      f'- old: linear.py, performer.py, linformer.py at {_REV.value}; new: this tree', '',
      '| family | T | old ms | new ms | proj ms | old / new | new / proj |',
      '|---|---:|---:|---:|---:|---:|---:|']
  for t in map(int, _LENGTHS.value):
    x, cot = (jax.random.normal(jax.random.key(i), (1, t, 256)) for i in (1, 2))
    for name in _NAMES.value:
      family, kw, causal = _FAMILIES[name]
      layer = Attention(256, 4, 64, family=family, family_kw=kw, causal=causal, max_len=t,
                        dtype=jnp.float32, rngs=nnx.Rngs(0))
      new_attend = layer.attend
      fns = {'new': benchlib.layer_grad(layer)}
      layer.attend = functools.partial(old[family].attend, **new_attend.keywords)
      fns['old'] = benchlib.layer_grad(layer)
      layer.attend = _projections_only
      fns['proj'] = benchlib.layer_grad(layer)
      layer.attend = new_attend
      _, params, _ = nnx.split(layer, nnx.Param, ...)
      got = {key: fn(params, x, cot) for key, fn in fns.items()}    # Compiles; checks agreement.
      diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                 for a, b in zip(jax.tree.leaves(got['new']), jax.tree.leaves(got['old'])))
      times = {key: [] for key in fns}
      order = list(fns)
      for _ in range(_REPS.value):
        shuffle(order)
        for key in order:
          times[key].append(timed(fns[key], params, x, cot))
      med = {key: float(np.median(v)) for key, v in times.items()}
      paired = float(np.median(np.array(times['old']) / np.array(times['new'])))
      lines.append(f'| {name} | {t} | {med["old"]:.0f} | {med["new"]:.0f} | {med["proj"]:.0f} | '
                   f'{paired:.2f} | {med["new"] / med["proj"]:.2f} |')
      print(lines[-1], f'(largest relative gradient difference {diff:.1e})', file=sys.stderr)
  benchlib.emit(None, lines, [])


if __name__ == '__main__':
  app.run(main)
