"""Where efflong's time goes in each row of the peer benchmark: XLA's ops, profiled (issue 19).

Command:
  ./launch.sh bench peers_profile [--length 16384] [--dense_length 4096] [--rows linear,...]
      [--calls 3] [--out experiments/results/peers_profile_cpu]

For each row of experiments/bench/peers.py (efflong's side: the same layer, forward + backward),
three things: the median wall time of --calls calls; a jax.profiler trace of --calls more, each
HLO op's time summed over the trace and divided by the calls; and the op's kind, read from the
compiled HLO: a matmul of the q / k / v / o projections ('projection dots'), another matmul
('attention dots'), a fusion computing exp ('exp'), a loop ('loop control': the while ops' own
time, less the ops inside them), a copy or transpose ('copies'), and the rest ('elementwise and
reductions'). XLA:CPU runs independent ops at once on the cores, so op times add to more than the
wall time: read the kinds' shares, not their sums. Dense runs at --dense_length (quadratic).
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

import benchlib
import peers

_KINDS = ('projection dots', 'attention dots', 'exp', 'loop control', 'copies',
          'elementwise and reductions')
_PROJECTION = re.compile(r'BTD,DNH->BTNH|BTNH,NHD->BTD')


def kind_of(name: str, line: str) -> str:
  """The kind of HLO op `name` whose compiled HLO line is `line` (see the module docstring)."""
  if line.split('=')[1].lstrip().startswith(('f32', 'bf16', 's32', '(')) and (
      ' dot(' in line or '__ynn_fusion' in line or 'dot_general' in line):
    return 'projection dots' if _PROJECTION.search(line) else 'attention dots'
  if name.startswith('while'):
    return 'loop control'
  if 'exponential' in name:
    return 'exp'
  if 'copy' in name or 'transpose' in name:
    return 'copies'
  return 'elementwise and reductions'


def op_times(step: Any, calls: int) -> dict[str, float]:
  """ms per call of each HLO op, from a profiler trace of `calls` calls of step()."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        step()
    trace = next(pathlib.Path(d).rglob('*.trace.json.gz'))
    events = json.loads(gzip.decompress(trace.read_bytes()))['traceEvents']
  total = collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and not name.startswith(('$', 'Thunk', 'Slinky', 'Pjit')):
      total[name] += e['dur'] / 1e3 / calls
  return dict(total)


def profile(row: peers.Row, t: int, calls: int) -> dict[str, Any]:
  """The row's wall time, its ms by kind and its 8 slowest ops (name, kind, ms, shape)."""
  x_np, ct_np = np.random.default_rng(t).standard_normal((2, peers._B, t, peers._D), np.float32)
  compiled, args = peers.efflong_step(row, x_np, ct_np)
  step = lambda: jax.block_until_ready(compiled(*args))
  step()
  wall = []
  for _ in range(calls):
    start = time.perf_counter()
    step()
    wall.append((time.perf_counter() - start) * 1e3)
  lines = {m[1]: m[0] for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.-]+) = .*$',
                                           compiled.as_text(), re.M)}
  times = op_times(step, calls)
  kinds = {name: kind_of(name, lines.get(name, name + ' = ?')) for name in times}
  by_kind = {k: sum(ms for n, ms in times.items() if kinds[n] == k) for k in _KINDS}
  # A while op's time includes its body's ops: keep only its own share.
  by_kind['loop control'] = max(0.0, by_kind['loop control'] - sum(
      ms for n, ms in times.items() if kinds[n] != 'loop control' and _in_loop(n, lines)))
  shape = lambda n: _result_shape(lines[n]) if n in lines else '?'
  top = sorted(times, key=times.get, reverse=True)[:8]
  return {'key': row.key, 'label': row.label, 'T': t, 'wall_ms': statistics.median(wall),
          'by_kind_ms': by_kind,
          'top': [{'op': n, 'kind': kinds[n], 'ms': times[n], 'shape': shape(n)} for n in top]}


def _result_shape(line: str) -> str:
  """The result type of an HLO line, without layouts, at most 60 characters."""
  result = re.split(r' (?:fusion|dot|while)\(', line.split('=', 1)[1])[0]
  return re.sub(r'\{[^}]*\}', '', result).strip()[:60]


def _in_loop(name: str, lines: dict[str, str]) -> bool:
  """Whether op `name` sits in a loop body (its HLO line names a while body's computation)."""
  return 'while/body' in lines.get(name, '')


def report(rows: list[dict[str, Any]], meta: list[str]) -> str:
  out = ['# Where efflong\'s time goes, per row of the peer benchmark (issue 19)', '', *meta, '',
         '| row | T | wall ms | ' + ' | '.join(_KINDS) + ' |',
         '|---|---:|---:|' + '---:|' * len(_KINDS)]
  for r in rows:
    total = sum(r['by_kind_ms'].values()) or 1.0
    out.append(f"| {r['label']} | {r['T']} | {r['wall_ms']:.0f} | " + ' | '.join(
        f"{r['by_kind_ms'][k]:.0f} ({100 * r['by_kind_ms'][k] / total:.0f}%)" for k in _KINDS)
               + ' |')
  out += ['', 'Op times in ms per call, summed over ops (ops overlap on the cores: the shares are '
          'what counts).', '', '## The slowest ops per row', '']
  for r in rows:
    out.append(f"- {r['label']}, T={r['T']}: " + '; '.join(
        f"{o['op']} {o['shape']} ({o['kind']}) {o['ms']:.0f} ms" for o in r['top']))
  return '\n'.join(out) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--length', type=int, default=16384)
  parser.add_argument('--dense_length', type=int, default=4096)
  parser.add_argument('--rows', default='', help='comma-separated row keys (default: every row)')
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--out', default='experiments/results/peers_profile_cpu')
  args = parser.parse_args()
  if any(os.environ.get(k) != v for k, v in peers._HEAP.items()):  # The heap the peer bench runs.
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]],
              {**os.environ, **peers._HEAP})
  rows = []
  for row in peers.selected(args):
    t = args.dense_length if row.quadratic else args.length
    print(f'{row.key} T={t}', file=sys.stderr, flush=True)
    rows.append(profile(row, t, args.calls))
  heap = ' '.join(f'{k}={v}' for k, v in peers._HEAP.items())
  meta = benchlib.header('CPU') + [f'- heap: {heap}']
  text = report(rows, meta)
  print(text)
  benchlib.write(args.out, text, rows)


if __name__ == '__main__':
  main()
