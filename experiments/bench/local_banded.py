"""The local and sparse families before and after reading band tiles as views (issue 19).

Times, per family and length, ONE attention layer with its projections (efflong.nn.attention.
Attention: batch 1, 4 heads, head dim 64, model dim 256, float32; jax.jit(jax.grad) of
sum(out * cotangent) with respect to the input and every parameter) twice in one process: with the
attention modules of this working tree ('new') and with those of the revision --base ('old', their
source read by `git show <base>:<path>` into temporary modules that import each other). Both
layers share their parameters, input and cotangent; the two calls run interleaved (new, old, old,
new, ... in a shuffled order per round) and each round's old / new ratio is recorded: the median
ratio is the result, robust to the load of a shared machine. The outputs and gradients of the two
are checked to agree before timing.

Command:
  .venv/bin/python experiments/bench/local_banded.py [--lengths 4096,16384] [--rounds 7]
      [--families local,local-bidir,longformer,strided,fixed,bigbird] [--base 793b095]
Prints one markdown row per (family, T): median ms old and new (wall clock, and the process's CPU
time, less sensitive to other processes) and the median of the per-round ratios old / new.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import subprocess
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efflong import config as config_lib
from efflong.nn.attention import Attention

# Entry -> (family, causal, hyper-parameters): the settings of experiments/bench/attention_scaling.
_FAMILIES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    'local': ('local', True, {'window': 256}),
    'local-bidir': ('local', False, {'window': 256}),
    'longformer': ('longformer', True, {'window': 256, 'global_tokens': 16,
                                        'separate_global': False}),
    'strided': ('strided', True, {'stride': 256}),
    'fixed': ('fixed', True, {'block': 256, 'summary': 8}),
    'bigbird': ('bigbird', True, {'window': 4, 'block': 64, 'global_tokens': 64,
                                  'random_blocks': 3}),
}
# The modules read at --base, in an order where each one's efflong imports come earlier.
_MODULES = ('blocksparse', 'local', 'sparse', 'longformer', 'bigbird')
_B, _N, _H, _D = 1, 4, 64, 256


def old_modules(base: str) -> dict[str, types.ModuleType]:
  """efflong.attention.<name> as of revision `base`, each importing the others' old versions."""
  old: dict[str, types.ModuleType] = {}
  for name in _MODULES:
    source = subprocess.run(['git', 'show', f'{base}:efflong/attention/{name}.py'], check=True,
                            capture_output=True, text=True).stdout
    module = sys.modules[f'efflong_old_{name}'] = types.ModuleType(f'efflong_old_{name}')
    exec(compile(source, f'{base}:{name}.py', 'exec'), module.__dict__)  # pylint: disable=exec-used
    for other, mod in old.items():  # The imports resolved to the new modules: point them back.
      if other in module.__dict__:
        module.__dict__[other] = mod
    old[name] = module
  return old


def layer_step(entry: str, t: int, old: dict[str, types.ModuleType] | None):
  """The jitted grad of one layer at length t and its arguments; old: use these attend modules."""
  family, causal, kw = _FAMILIES[entry]
  hyper = {**config_lib.attention_defaults(family).to_dict(), **kw}
  layer = Attention(_D, _N, _H, family=family, family_kw=hyper, causal=causal, max_len=t,
                    stack_modules={}, dtype=jnp.float32, rngs=nnx.Rngs(0))
  if old is not None:
    fn = layer.attend.func
    layer.attend = functools.partial(getattr(old[fn.__module__.rsplit('.', 1)[-1]], fn.__name__),
                                     **layer.attend.keywords)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x, ct = np.random.default_rng(t).standard_normal((2, _B, t, _D), np.float32)

  def loss(params, x, ct):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x, segment_ids=None) * ct)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, jnp.asarray(x), jnp.asarray(ct))


def compare(entry: str, t: int, old: dict[str, types.ModuleType], rounds: int) -> dict[str, Any]:
  """Checks that old and new agree, then times them interleaved; returns the row."""
  calls = {'new': layer_step(entry, t, None), 'old': layer_step(entry, t, old)}
  grads = {k: jax.block_until_ready(f(*args)) for k, (f, args) in calls.items()}
  err = max(float(jnp.max(jnp.abs(a - b)) / (float(jnp.max(jnp.abs(b))) + 1e-30))
            for a, b in zip(jax.tree.leaves(grads['new']), jax.tree.leaves(grads['old'])))
  wall = {k: [] for k in calls}
  cpu = {k: [] for k in calls}
  for _ in range(rounds):
    for k in random.sample(list(calls), len(calls)):
      f, args = calls[k]
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(f(*args))
      wall[k].append(time.perf_counter() - start)
      cpu[k].append(time.process_time() - start_cpu)
  ratio = lambda d: statistics.median(o / n for o, n in zip(d['old'], d['new']))
  return {'family': entry, 'T': t, 'old_ms': 1e3 * statistics.median(wall['old']),
          'new_ms': 1e3 * statistics.median(wall['new']), 'ratio': ratio(wall),
          'old_cpu_ms': 1e3 * statistics.median(cpu['old']),
          'new_cpu_ms': 1e3 * statistics.median(cpu['new']), 'cpu_ratio': ratio(cpu),
          'max_rel_grad_diff': err}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='4096,16384')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--families', default=','.join(_FAMILIES))
  parser.add_argument('--base', default='793b095', help='the revision of the old modules')
  args = parser.parse_args(argv)
  old = old_modules(args.base)
  print(f'old: efflong/attention/{{{",".join(_MODULES)}}}.py at {args.base}; new: the working '
        'tree\n')
  print('| family | T | old ms | new ms | old / new | old CPU ms | new CPU ms | old / new (CPU) '
        '| max rel. grad diff |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for entry in args.families.split(','):
    for t in map(int, args.lengths.split(',')):
      r = compare(entry, t, old, args.rounds)
      print(f'| {entry} | {t} | {r["old_ms"]:.0f} | {r["new_ms"]:.0f} | {r["ratio"]:.2f} | '
            f'{r["old_cpu_ms"]:.0f} | {r["new_cpu_ms"]:.0f} | {r["cpu_ratio"]:.2f} | '
            f'{r["max_rel_grad_diff"]:.1e} |', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
