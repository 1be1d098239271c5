"""Context parallelism: per-device memory and bytes communicated of one train step against T.

For every attention family with a context twin (the registry's `Family.context`: new twins join
automatically) and each --contexts size c, the duplication LM (configs/duplication.py) with a tiny
model (1 layer, d_model 64, 2 heads, d_ff 128, batch 1, float32, AdamW) is set up by the trainer on
a mesh of c devices (mesh.context = c; c = 1 is the family's plain attend on one device), and its
train step is compiled, never run:
- memory: XLA's memory analysis of the compiled step, per device: arguments + outputs - donated
  aliases + temporaries;
- bytes sent per device: read from the compiled HLO, each collective's operand bytes counted as
  many times as it runs (while loops by their known trip counts), as a ring moves them:
  collective-permute: the operand, times the share of devices whose pair is not to itself;
  all-gather: its input times (G - 1); all-reduce: 2 (G - 1) / G times the operand;
  reduce-scatter: its output times (G - 1); all-to-all: (G - 1) / G times the operand (G: the
  group's size). The all-reduce also carries the parameters' gradients (replicated over context).

Checks: at --check_length, memory(c) <= memory(1) / (0.8 c) for the families of --ideal_families
(>= 0.8 of the ideal 1 / c fall), and, over --lengths, the longest T whose memory fits
--budget_gib grows with c. The fake CPU devices share the host's cores: times are not measured.

Command:
  ./launch.sh bench context_parallel [--lengths=16384,65536,262144,524288] [--contexts=1,2,4,8]
      [--other_contexts=1,4] [--sweep_families=dense] [--check_length=65536] [--budget_gib=1]
      [--out=experiments/results/context_parallel_cpu]
  (or .venv/bin/python experiments/bench/context_parallel.py with the same flags)
Prints markdown; with --out also writes <out>.md and the rows as <out>.json.
"""

from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

# pylint: disable=g-import-not-at-top,wrong-import-position (XLA_FLAGS before jax)
import json
import math
import pathlib
import re
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags

import benchlib
from efflong import attention
from efflong import config as config_lib
from efflong.train import sharding, trainer

_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'duplication.py'
_MIB = 2**20

# Hyper-parameters that do not grow with T (the duplication config's are set against T / 2).
BENCH_KW = {
    'local': dict(window=256),
    'longformer': dict(window=256, global_tokens=1, dilation=1),
    'strided': dict(stride=256),
    'fixed': dict(block=256, summary=4),
    'bigbird': dict(block=64, window=1, random_blocks=2, global_tokens=2),
}

_LENGTHS = flags.DEFINE_list('lengths', ['16384', '65536', '262144', '524288'],
                             'T of the memory sweep (and the longest-T search).')
_CONTEXTS = flags.DEFINE_list('contexts', ['1', '2', '4', '8'], 'mesh.context sizes.')
_OTHER_CONTEXTS = flags.DEFINE_list('other_contexts', ['1', '4'], 'mesh.context sizes of the '
                                    'families outside --ideal_families (fewer compilations).')
_FAMILIES = flags.DEFINE_list('families', None, 'Families at --check_length (default: every '
                              'family with a context twin).')
_SWEEP = flags.DEFINE_list('sweep_families', ['dense'],
                           'Families swept over --lengths.')
_IDEAL = flags.DEFINE_list('ideal_families', ['dense', 'local', 'linear'],
                           'Families that must reach 0.8 of the ideal 1 / c memory.')
_CHECK_LENGTH = flags.DEFINE_integer('check_length', 65536, 'T of the all-families table.')
_BUDGET_GIB = flags.DEFINE_float('budget_gib', 1.0, 'Per-device budget of the longest-T search.')
_OUT = flags.DEFINE_string('out', None, 'Write <out>.md and <out>.json.')

_COLLECTIVES = ('collective-permute', 'all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8}


def make_config(family: str, seq_len: int, context: int) -> ml_collections.ConfigDict:
  """configs/duplication.py at seq_len with this benchmark's model, on `context` devices."""
  c = config_lib.load_module(str(_CONFIG_FILE)).get_config(f'seq_len={seq_len},attention={family}')
  c.model.attention_kw.update(BENCH_KW.get(family, {}))
  c.model.update(num_layers=1, d_model=64, num_heads=2, d_ff=128)
  c.train.batch_size = 1
  c.mesh.update(data=1, fsdp=1, context=context, model=1)
  return c


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: 'f32[1,256,2,32]{...}' or a tuple '(f32[2], s32[])'."""
  return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
             for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape)
             if dtype in _DTYPE_BYTES)


def group_size(line: str, devices: int) -> int:
  """The size G of a collective's groups, from its replica_groups."""
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if named:
    dims = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return math.prod(int(dims[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r'replica_groups=\[([\d,]+)\]<=', line)
  if iota:
    return int(iota.group(1).split(',')[-1])
  listed = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  return len(listed.group(1).split(',')) if listed and listed.group(1) else devices


def sent_bytes(line: str, operand_bytes: int, result_bytes: int, devices: int) -> float:
  """Bytes one device sends for one execution of the collective on `line` (module docstring)."""
  kind = next(k for k in _COLLECTIVES if f' {k}(' in line or f' {k}-start(' in line)
  if kind == 'collective-permute':
    pairs = re.findall(r'\{(\d+),(\d+)\}', line.split('source_target_pairs=')[1].split('}}')[0]
                       + '}')
    moving = sum(a != b for a, b in pairs)
    return operand_bytes * moving / devices
  g = group_size(line, devices)
  return {'all-gather': operand_bytes * (g - 1), 'all-reduce': operand_bytes * 2 * (g - 1) / g,
          'reduce-scatter': result_bytes * (g - 1),
          'all-to-all': operand_bytes * (g - 1) / g}[kind]


def communicated(hlo: str, devices: int) -> dict[str, float]:
  """Bytes sent per device per step, by collective kind, from a compiled module's text."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    head = re.match(r'(ENTRY )?%(\S+) .*\{\s*$', line)
    if head and not line.startswith(' '):
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif current is not None and line.startswith(' '):
      comps[current].append(line)

  memo: dict[str, dict[str, float]] = {}

  def total(name: str) -> dict[str, float]:
    if name in memo:
      return memo[name]
    lines = comps.get(name, [])
    shapes = {}
    for line in lines:
      m = re.match(r'\s*(ROOT )?%(\S+) = (\(.*?\)|\S+) ', line)
      if m:
        shapes[m.group(2)] = m.group(3)
    out: dict[str, float] = {}
    add = lambda kind, n: out.__setitem__(kind, out.get(kind, 0.0) + n)
    for line in lines:
      m = re.match(r'\s*(ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)', line)
      if not m:
        continue
      op = m.group(4).removesuffix('-start')
      if op in _COLLECTIVES:
        operands = re.findall(r'%([\w.-]+)', m.group(5))
        operand_bytes = sum(shape_bytes(shapes.get(o, '')) for o in operands)
        add(op, sent_bytes(line, operand_bytes, shape_bytes(m.group(3)), devices))
      elif op == 'while':
        body = re.search(r'body=%([\w.-]+)', line).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        for kind, n in total(body).items():
          add(kind, n * (int(trips.group(1)) if trips else 1))
      elif op in ('conditional', 'call'):
        called = re.findall(r'%([\w.-]+)', line.split('branch_computations=')[-1]
                            if op == 'conditional' else line.split('to_apply=')[-1])
        branches = [total(c) for c in called if c in comps]
        for kind in {k for b in branches for k in b}:
          add(kind, max(b.get(kind, 0.0) for b in branches))
    memo[name] = out
    return out

  return total(entry)


def measure(family: str, seq_len: int, context: int) -> dict[str, Any]:
  """Compiles the train step of one cell: its per-device memory and bytes sent."""
  row: dict[str, Any] = dict(family=family, seq_len=seq_len, context=context)
  print(f'{row}...', file=sys.stderr, flush=True)
  start = time.perf_counter()
  try:
    run = trainer.setup(make_config(family, seq_len, context), jax.devices())
    batch = sharding.global_batch(next(iter(run.task.train_dataset(0, 1))), run.batch_sharding)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         run.abstract, run.shardings)
    step = run.train_step.lower(state, batch).compile()
  except Exception as e:  # pylint: disable=broad-except (a cell that fails is a row, not a stop)
    return {**row, 'status': f'failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}'}
  mem = step.memory_analysis()
  row.update(status='ok', compile_s=time.perf_counter() - start,
             mib=(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes) / _MIB,
             temp_mib=mem.temp_size_in_bytes / _MIB,
             sent_mib={k: v / _MIB for k, v in communicated(step.as_text(), context).items()})
  return row


def cell(row: dict[str, Any] | None, fmt: str = ',.1f') -> str:
  if row is None:
    return '—'
  return format(row['mib'], fmt) if row['status'] == 'ok' else row['status'].replace('|', '/')


def report(rows: list[dict[str, Any]], contexts: list[int], lengths: list[int],
           families: list[str]) -> tuple[list[str], bool]:
  find = {(r['family'], r['seq_len'], r['context']): r for r in rows}
  ok = True
  contexts = sorted({r['context'] for r in rows})
  device = f'{jax.default_backend()}: {len(jax.devices())} x {jax.devices()[0].device_kind}'
  lines = ['## Context parallelism: per-device memory and bytes sent of one train step\n',
           *benchlib.header(device),
           '- model: duplication LM, 1 layer, d_model 64, 2 heads, d_ff 128, batch 1, float32, '
           f'AdamW; families\' hyper-parameters: {json.dumps(BENCH_KW)}',
           '- compiled only (`lower().compile()`), never run; c = 1 is the family\'s own attend on '
           'one device, c > 1 its context twin over mesh.context = c', '']
  t = _CHECK_LENGTH.value
  lines += [f'### T = {t}: per-device MiB (memory(1) / memory(c) in parentheses)', '',
            '| family | ' + ' | '.join(f'c = {c}' for c in contexts) + ' |',
            '|---|' + '---:|' * len(contexts)]
  checks = []
  for family in families:
    base = find.get((family, t, 1))
    cells = []
    for c in contexts:
      r = find.get((family, t, c))
      ratio = (f' ({base["mib"] / r["mib"]:.2f})' if c > 1 and r and base and
               r['status'] == base['status'] == 'ok' else '')
      cells.append(cell(r) + ratio)
      if family in _IDEAL.value and c > 1:
        good = bool(r and base and r['status'] == base['status'] == 'ok'
                    and base['mib'] / r['mib'] >= 0.8 * c)
        ok &= good
        checks.append(f'- {"ok" if good else "FAILED"}: {family} c = {c}: memory(1) / memory(c) '
                      f'= {base["mib"] / r["mib"]:.2f} >= 0.8 x {c}' if r and base and
                      r['status'] == base['status'] == 'ok' else f'- FAILED: {family} c = {c}: '
                      'not measured')
    lines.append(f'| {family} | ' + ' | '.join(cells) + ' |')
  lines += ['', f'Bytes sent per device per step at T = {t} (MiB; collective kinds as counted in '
            'the module docstring):', '',
            '| family | c | ' + ' | '.join(_COLLECTIVES) + ' |', '|---|---:|' + '---:|' * 5]
  for family in families:
    for c in contexts[1:]:
      r = find.get((family, t, c))
      if r and r['status'] == 'ok':
        lines.append(f'| {family} | {c} | ' + ' | '.join(
            f'{r["sent_mib"].get(k, 0.0):,.2f}' for k in _COLLECTIVES) + ' |')
  budget = _BUDGET_GIB.value * 1024
  lines += ['', f'### Memory against T (per-device MiB) and the longest T within '
            f'{_BUDGET_GIB.value:g} GiB', '',
            '| family | c | ' + ' | '.join(str(n) for n in lengths) + ' | longest T |',
            '|---|---:|' + '---:|' * (len(lengths) + 1)]
  for family in _SWEEP.value:
    longest = []
    for c in contexts:
      own = [find.get((family, n, c)) for n in lengths]
      fits = [n for n, r in zip(lengths, own) if r and r['status'] == 'ok' and r['mib'] <= budget]
      longest.append(max(fits, default=0))
      lines.append(f'| {family} | {c} | ' + ' | '.join(cell(r) for r in own) +
                   f' | {longest[-1] or "none"} |')
    grows = all(a < b or b == max(lengths) for a, b in zip(longest, longest[1:]))
    ok &= grows
    checks.append(f'- {"ok" if grows else "FAILED"}: {family}: the longest T within the budget '
                  f'grows with c: {longest}')
  lines += ['', '### Checks', '', *checks]
  return lines, ok


def main(argv: list[str]) -> None:
  del argv
  contexts, lengths = [int(c) for c in _CONTEXTS.value], [int(n) for n in _LENGTHS.value]
  families = _FAMILIES.value or attention.names(context_parallel=True)
  others = [int(c) for c in _OTHER_CONTEXTS.value]
  cells = [(f, _CHECK_LENGTH.value, c) for f in families
           for c in (contexts if f in _IDEAL.value else others)]
  cells += [(f, n, c) for f in _SWEEP.value for n in lengths for c in contexts
            if (f, n, c) not in cells and f in families]
  rows = [measure(*key) for key in cells]
  lines, ok = report(rows, contexts, lengths, families)
  benchlib.emit(_OUT.value, lines, rows)
  if not ok:
    sys.exit('a check failed')


if __name__ == '__main__':
  app.run(main)
