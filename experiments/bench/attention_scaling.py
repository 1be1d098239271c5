"""Forward+backward time and peak memory of each attention family against dense, per length.

For each family of _FAMILIES (those registered in efflong.attention; the others are skipped with a
note) and each --lengths value T it jits jax.value_and_grad of sum(attend(q, k, v) * cotangent)
with respect to q, k, v, for float32 q, k, v [1, T, 4, 64], and times --repeats calls (wall clock,
jax.block_until_ready) after one warm-up call. Each (family, T) runs in a fresh subprocess
(--one=family:T), so its peak memory is its own: peak_bytes_in_use where the device reports it
(GPU), else the growth of the process's peak RSS (CPU). XLA's compiled memory analysis is reported
beside it, and a run whose analysis exceeds --memory_budget_gib is skipped before it allocates: this
is how dense goes as far as memory allows. A run that dies (out-of-memory kill, error, timeout) is
recorded as such.

Command:
  ./launch.sh bench attention_scaling [--families=dense,local,...] [--lengths=1024,4096,16384,65536]
      [--causal|--nocausal] [--repeats=3] [--memory_budget_gib=18] [--timeout_s=1200]
      [--out=experiments/results/attention_scaling_cpu]
  (or .venv/bin/python experiments/bench/attention_scaling.py with the same flags)
Prints markdown: the machine and versions, one table row per (family, T), and per family the time
and memory ratios between the two longest lengths; with --out also writes <out>.md, the rows as
<out>.json and, where matplotlib is installed, <out>.png (else redraw it with --replot=<out>).
On a GPU, set --memory_budget_gib to what the device holds.
"""

from __future__ import annotations

import json
import pathlib
import resource
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import benchlib
from efflong import attention
from efflong.attention import Mask

# Hyper-parameters of each entry in this benchmark; add a family here to measure it. An entry is a
# family name, optionally followed by '-<variant>' for another setting of the same family.
_FAMILIES: dict[str, dict[str, Any]] = {
    'dense': {},
    'local': {'window': 256},
    'longformer': {'window': 256, 'global_tokens': 16, 'separate_global': False},
    'strided': {'stride': 256},
    'fixed': {'block': 256, 'summary': 8},
    # BigBird's window counts blocks of `block` tokens on each side: 4 x 64 = 256 tokens.
    'bigbird': {'window': 4, 'block': 64, 'global_tokens': 64, 'random_blocks': 3},
    'linear': {},
    'performer': {'nb_features': 256},
    'linformer': {'k': 256},
    **{f'lsh-{r}': {'bucket_size': 64, 'n_hashes': r} for r in (1, 2, 4, 8)},
}


def _family(name: str) -> attention.Family:
  """The registered family of a table entry ('lsh-4' -> lsh)."""
  return attention.get(name.split('-')[0])
_BATCH, _HEADS, _HEAD_DIM = 1, 4, 64
_MIB, _GIB = 2**20, 2**30
_PEAK_NOTES = {
    'peak RSS growth MiB': 'peak RSS growth: ru_maxrss after the timed calls minus before setup, '
                           'compilation included.',
    'peak device MiB': "peak device MiB: the device's peak_bytes_in_use after the timed calls.",
}

_FAMILY_NAMES = flags.DEFINE_list('families', list(_FAMILIES), 'Families to measure.')
_LENGTHS = flags.DEFINE_list('lengths', ['1024', '4096', '16384', '65536'], 'Sequence lengths.')
_CAUSAL = flags.DEFINE_boolean('causal', True, 'Causal masks (else bidirectional).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls after one warm-up call; the median.')
_BUDGET_GIB = flags.DEFINE_float(
    'memory_budget_gib', 18.0, 'Skip a run whose XLA memory analysis exceeds this many GiB.')
_TIMEOUT_S = flags.DEFINE_integer('timeout_s', 1200, 'Wall-clock limit of each run, compile '
                                  'included.')
_OUT = flags.DEFINE_string('out', None, 'Also write <out>.md and a log-log plot <out>.png.')
_ONE = flags.DEFINE_string('one', None, 'Internal: measure this one family:T, print it as JSON.')
_REPLOT = flags.DEFINE_string('replot', None, 'Only redraw <replot>.png from <replot>.json (for '
                              'results measured on a machine without matplotlib).')


def measure(name: str, length: int) -> dict[str, Any]:
  """Compiles, warms up and times fwd+bwd of family `name` at T=length in this process."""
  device = jax.devices()[0]
  rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  family = _family(name)
  attend = family.bind(causal=_CAUSAL.value, **_FAMILIES[name])
  mask = Mask(causal=_CAUSAL.value)
  shape = (_BATCH, length, _HEADS, _HEAD_DIM)
  q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32)
                        for key in jax.random.split(jax.random.key(0), 4))
  # The family's module (performer's feature matrix, ...) makes its inputs once, outside the timing.
  module = family.make_module(_FAMILIES[name], d_model=_HEADS * _HEAD_DIM, num_heads=_HEADS,
                              num_kv_heads=_HEADS, head_dim=_HEAD_DIM, max_len=length,
                              stack_modules={}, dtype=jnp.float32, rngs=nnx.Rngs(0))
  inputs = {} if module is None else module(q.reshape(_BATCH, length, -1))

  def loss(q: jax.Array, k: jax.Array, v: jax.Array, cotangent: jax.Array) -> jax.Array:
    return jnp.sum(attend(q, k, v, mask=mask, **inputs) * cotangent)

  row = {'family': name, 'length': length,
         'device': f'{jax.default_backend()}: {len(jax.devices())} x {device.device_kind}'}

  print(f'{name} T={length}: compiling...', file=sys.stderr, flush=True)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v, cotangent).compile()
  mem = step.memory_analysis()
  if mem is not None:
    row['compiled_mib'] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / _MIB
    if row['compiled_mib'] * _MIB > _BUDGET_GIB.value * _GIB:
      row['status'] = f'skipped: needs {row["compiled_mib"] * _MIB / _GIB:.3g} GiB'
      return row

  jax.block_until_ready(step(q, k, v, cotangent))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(step(q, k, v, cotangent))
    times.append(time.perf_counter() - start)

  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row['peak_name'], peak_bytes = 'peak device MiB', stats['peak_bytes_in_use']
  else:
    rss_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row['peak_name'], peak_bytes = 'peak RSS growth MiB', (rss_after_kib - rss_before_kib) * 1024
  seconds = statistics.median(times)
  row.update(status='ok', seconds=seconds, us_per_token=seconds / (_BATCH * length) * 1e6,
             peak_mib=peak_bytes / _MIB)
  return row


def run_one(name: str, length: int) -> dict[str, Any]:
  """measure(name, length) in a fresh subprocess; a failure becomes the row's status."""
  print(f'{name} T={length}...', file=sys.stderr, flush=True)
  return benchlib.run_child(__file__, [*sys.argv[1:], f'--one={name}:{length}'],
                            {'family': name, 'length': length}, _TIMEOUT_S.value)


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
  return format(row[key], fmt) if key in row else '—'


def ratio(rows: list[dict[str, Any]], key: str) -> str:
  """rows[-1][key] / rows[-2][key] when both have it, else a dash."""
  if len(rows) < 2 or any(key not in r for r in rows[-2:]):
    return '—'
  return f'{rows[-1][key] / rows[-2][key]:.2f}'


def report(rows: list[dict[str, Any]], notes: list[str], lengths: list[int]) -> str:
  """The markdown report of the measured rows."""
  measured = [r for r in rows if 'device' in r]
  peak_name = next((r['peak_name'] for r in rows if 'peak_name' in r), 'peak RSS growth MiB')
  direction = 'causal' if _CAUSAL.value else 'bidirectional'
  lines = [
      f'## Attention fwd+bwd scaling: batch {_BATCH}, {_HEADS} heads, head_dim {_HEAD_DIM}, '
      f'float32, {direction}\n',
      *benchlib.header(measured[0]['device'] if measured else
                       'unknown (no run started a backend)'),
      f'- timing: median of {_REPEATS.value} calls after 1 warm-up call; memory budget '
      f'{_BUDGET_GIB.value:g} GiB of XLA memory analysis',
      '- hyper-parameters: ' + '; '.join(
          f'{n} {_FAMILIES[n]}' for n in dict.fromkeys(r['family'] for r in rows)),
      *(f'- {note}' for note in notes), '',
      f'| family | T | fwd+bwd s | µs/token | {peak_name} | XLA MiB |',
      '|---|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    seconds = cell(r, 'seconds', '.4f') if r['status'] == 'ok' else r['status']
    lines.append(f'| {r["family"]} | {r["length"]} | {seconds} | {cell(r, "us_per_token", ".2f")} '
                 f'| {cell(r, "peak_mib", ",.1f")} | {cell(r, "compiled_mib", ",.1f")} |')
  if len(lengths) >= 2:
    a, b = lengths[-2:]
    lines += ['', f'Growth from T={a} to T={b} (×{b / a:g} length: linear cost gives ×{b / a:g}, '
              f'quadratic ×{(b / a) ** 2:g}):', '',
              f'| family | time({b})/time({a}) | peak memory ratio | XLA memory ratio |',
              '|---|---:|---:|---:|']
    for name in dict.fromkeys(r['family'] for r in rows):
      own = [r for r in rows if r['family'] == name and r['length'] in (a, b)]
      lines.append(f'| {name} | {ratio(own, "seconds")} | {ratio(own, "peak_mib")} | '
                   f'{ratio(own, "compiled_mib")} |')
  lines += ['', 'µs/token: median fwd+bwd seconds / (batch × T). XLA MiB: XLA memory analysis of '
            'the compiled fwd+bwd, arguments + outputs + temporaries (also for skipped runs).',
            _PEAK_NOTES[peak_name]]
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Log-log time and memory against T, one line per family; dashed: XLA's prediction."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top (not on every device)
  fig = Figure(figsize=(11, 4.5), layout='constrained')
  ax_time, ax_mem = fig.subplots(1, 2)
  for name in dict.fromkeys(r['family'] for r in rows):
    ok = [r for r in rows if r['family'] == name and r['status'] == 'ok']
    xla = [r for r in rows if r['family'] == name and 'compiled_mib' in r]
    line, = ax_time.plot([r['length'] for r in ok], [r['seconds'] for r in ok], 'o-', label=name)
    ax_mem.plot([r['length'] for r in ok], [r['peak_mib'] for r in ok], 'o-',
                color=line.get_color(), label=name)
    ax_mem.plot([r['length'] for r in xla], [r['compiled_mib'] for r in xla], 'x--',
                color=line.get_color(), alpha=0.6)
  ax_time.set(title='fwd+bwd time', xlabel='T', ylabel='seconds', xscale='log', yscale='log')
  ax_mem.set(title='peak memory (dashed: XLA analysis)', xlabel='T', ylabel='MiB', xscale='log',
             yscale='log')
  ax_time.legend()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
  del argv
  if _REPLOT.value is not None:
    out = pathlib.Path(_REPLOT.value)
    plot(json.loads(out.with_name(out.name + '.json').read_text()), out.with_name(out.name + '.png'))
    return
  if _ONE.value is not None:
    name, length = _ONE.value.split(':')
    print(json.dumps(measure(name, int(length))))
    return
  unknown = sorted(set(_FAMILY_NAMES.value) - set(_FAMILIES))
  if unknown:
    raise app.UsageError(f'--families: {unknown} not in the table; known: {list(_FAMILIES)}.')
  lengths = [int(t) for t in _LENGTHS.value]
  if min(lengths) <= 0:
    raise app.UsageError(f'--lengths must be positive; got {lengths}.')
  # One fresh process per (family, T); this one never starts a backend (it would hold GPU memory).
  rows, notes = [], []
  for name in _FAMILY_NAMES.value:
    if name.split('-')[0] not in attention.names():
      notes.append(f'{name}: skipped, not registered in efflong.attention')
      continue
    try:  # the table's hyper-parameters and the masking direction, checked without a backend
      _family(name).bind(causal=_CAUSAL.value, **_FAMILIES[name])
    except (TypeError, ValueError) as e:
      notes.append(f'{name}: skipped, {e}')
      continue
    rows += [run_one(name, t) for t in lengths]

  text = report(rows, notes, lengths)
  print(text)
  if _OUT.value:
    out = benchlib.write(_OUT.value, text, rows)
    try:
      plot(rows, out.with_name(out.name + '.png'))
    except ImportError:
      print(f'matplotlib is not installed: no plot; redraw it elsewhere with --replot={out}',
            file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
