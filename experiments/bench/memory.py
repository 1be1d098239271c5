"""Peak memory of one train step against depth, reversible or not; the longest trainable length.

Two tables (Reformer, section 3 and 5: reversible layers make activation memory flat in depth;
chunked feed-forward and LSH make it linear in T):
1. Depth: the duplication LM (configs/duplication.py) at --seq_len, batch 1, with --attention, for
   each of --depths layers, plain (the usual residual stack, whole feed-forward) against reversible
   with a chunked feed-forward (model.reversible, model.ff_chunk_size = --ff_chunk). Each row
   compiles the trainer's own train step (AdamW, donation), reads XLA's memory analysis, then runs
   one step and records its time and the peak memory the process reached.
2. Longest T: the --long_layers-layer reversible, chunked-FF model at each of --long_lengths. XLA's
   memory analysis of each compiled step comes first; the longest T whose analysis fits in
   --memory_budget_gib is then run for one step, which shows it trains (a finite loss) here.
Each measurement runs in a fresh subprocess (--one=JSON), so its peak memory is its own:
peak_bytes_in_use where the device reports it (GPU), else the growth of the process's peak RSS
(CPU; it includes compilation).

Command:
  ./launch.sh bench memory [--seq_len=16384] [--depths=2,6,12] [--attention=lsh]
      [--long_lengths=16384,32768,65536,131072,262144] [--memory_budget_gib=20]
      [--out=experiments/results/memory_cpu]
  (or .venv/bin/python experiments/bench/memory.py with the same flags)
Prints markdown; with --out also writes <out>.md and the rows as <out>.json.
"""

from __future__ import annotations

import json
import pathlib
import resource
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

import benchlib
from efflong import config as config_lib
from efflong.train import sharding, trainer

_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'duplication.py'
_MIB = 2**20

_SEQ_LEN = flags.DEFINE_integer('seq_len', 16384, 'Length of the depth table.')
_DEPTHS = flags.DEFINE_list('depths', ['2', '6', '12'], 'Layer counts of the depth table.')
_ATTENTION = flags.DEFINE_string('attention', 'lsh', 'Attention family.')
_ATTENTION_KW = flags.DEFINE_string('attention_kw', '{"bucket_size": 64, "n_hashes": 1}',
                                    "The family's hyper-parameters, as JSON.")
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Width.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Attention heads.')
_D_FF = flags.DEFINE_integer('d_ff', 1024, 'Feed-forward width.')
_FF_CHUNK = flags.DEFINE_integer('ff_chunk', 1024, 'model.ff_chunk_size of the reversible rows.')
_LONG_LAYERS = flags.DEFINE_integer('long_layers', 6, 'Layers of the longest-T search.')
_LONG_LENGTHS = flags.DEFINE_list('long_lengths', ['16384', '32768', '65536', '131072', '262144'],
                                  'Lengths of the longest-T search.')
_BUDGET_GIB = flags.DEFINE_float('memory_budget_gib', 20.0,
                                 'Largest XLA memory analysis run in the longest-T search.')
_TIMEOUT_S = flags.DEFINE_float('timeout_s', 1800, 'Per-measurement time limit, seconds.')
_OUT = flags.DEFINE_string('out', None, 'Write <out>.md and <out>.json.')
_ONE = flags.DEFINE_string('one', None, 'Internal: measure this JSON spec, print its row as JSON.')


def make_config(seq_len: int, layers: int, reversible: bool) -> ml_collections.ConfigDict:
  """configs/duplication.py at seq_len with this benchmark's model, batch 1."""
  c = config_lib.load_module(str(_CONFIG_FILE)).get_config(
      f'seq_len={seq_len},attention={_ATTENTION.value}')
  c.model.attention_kw.update(json.loads(_ATTENTION_KW.value))
  c.model.update(num_layers=layers, d_model=_D_MODEL.value, num_heads=_HEADS.value,
                 d_ff=_D_FF.value, reversible=reversible,
                 ff_chunk_size=_FF_CHUNK.value if reversible else 0)
  c.train.batch_size = 1
  return c


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Compiles the train step of spec (seq_len, layers, reversible); runs it once if spec['run']."""
  rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  run = trainer.setup(make_config(spec['seq_len'], spec['layers'], spec['reversible']))
  state = run.init()
  batch = sharding.global_batch(next(iter(run.task.train_dataset(0, 1))), run.batch_sharding)
  start = time.perf_counter()
  step = run.train_step.lower(state, batch).compile()
  row = {**spec, 'status': 'ok', 'compile_s': time.perf_counter() - start}
  mem = step.memory_analysis()
  row['temp_mib'] = mem.temp_size_in_bytes / _MIB
  # Donated state is both an argument and an output: count it once.
  row['compiled_mib'] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                         - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / _MIB
  device = jax.devices()[0]
  row['device'] = f'{jax.default_backend()}: {len(jax.devices())} x {device.device_kind}'
  if not spec['run']:
    return row
  start = time.perf_counter()
  state, _, scalars = step(state, batch)
  jax.block_until_ready((state, scalars))
  row['step_s'] = time.perf_counter() - start
  row['loss'] = float(scalars['loss'])
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row['peak_name'], row['peak_mib'] = 'peak device MiB', stats['peak_bytes_in_use'] / _MIB
  else:
    rss_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row['peak_name'], row['peak_mib'] = 'peak RSS growth MiB', (rss_after_kib - rss_before_kib) / 1024
  return row


def run_one(seq_len: int, layers: int, reversible: bool, run: bool) -> dict[str, Any]:
  spec = dict(seq_len=seq_len, layers=layers, reversible=reversible, run=run)
  print(f'{spec}...', file=sys.stderr, flush=True)
  return benchlib.run_child(__file__, [*sys.argv[1:], f'--one={json.dumps(spec)}'], spec,
                            _TIMEOUT_S.value)


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
  return format(row[key], fmt) if key in row else row['status'] if row['status'] != 'ok' else '—'


def report(depth_rows: list[dict[str, Any]], long_rows: list[dict[str, Any]]) -> str:
  rows = depth_rows + long_rows
  measured = [r for r in rows if 'device' in r]
  peak_name = next((r['peak_name'] for r in rows if 'peak_name' in r), 'peak RSS growth MiB')
  lines = [
      f'## Train-step memory: {_ATTENTION.value} {_ATTENTION_KW.value}, d_model {_D_MODEL.value}, '
      f'{_HEADS.value} heads, d_ff {_D_FF.value}, batch 1, float32, AdamW\n',
      *benchlib.header(measured[0]['device'] if measured else 'unknown'),
      f'- reversible rows: model.reversible = True, model.ff_chunk_size = {_FF_CHUNK.value}; plain '
      'rows: the residual stack, whole feed-forward', '']
  if depth_rows:
    lines += [f'### Depth at T = {_SEQ_LEN.value}', '',
              f'| layers | stack | XLA MiB | XLA temp MiB | {peak_name} | step s | loss |',
              '|---:|---|---:|---:|---:|---:|---:|']
    for r in depth_rows:
      lines.append(f'| {r["layers"]} | {"reversible" if r["reversible"] else "plain"} | '
                   f'{cell(r, "compiled_mib", ",.1f")} | {cell(r, "temp_mib", ",.1f")} | '
                   f'{cell(r, "peak_mib", ",.1f")} | {cell(r, "step_s", ".1f")} | '
                   f'{cell(r, "loss", ".3f")} |')
    lines += ['', f'Peak({max(r["layers"] for r in depth_rows)} layers) / peak('
              f'{min(r["layers"] for r in depth_rows)} layers):', '']
    for reversible in (False, True):
      own = sorted((r for r in depth_rows if r['reversible'] == reversible and 'peak_mib' in r),
                   key=lambda r: r['layers'])
      if len(own) >= 2:
        lines.append(f'- {"reversible" if reversible else "plain"}: XLA '
                     f'{own[-1]["compiled_mib"] / own[0]["compiled_mib"]:.2f}, '
                     f'{peak_name.removesuffix(" MiB")} '
                     f'{own[-1]["peak_mib"] / own[0]["peak_mib"]:.2f}')
  lines += ['', f'### Longest T, {_LONG_LAYERS.value} layers, reversible, chunked feed-forward '
            f'(budget {_BUDGET_GIB.value:g} GiB of XLA memory analysis)', '',
            f'| T | XLA MiB | XLA temp MiB | compile s | {peak_name} | step s | loss |',
            '|---:|---:|---:|---:|---:|---:|---:|']
  for r in long_rows:
    lines.append(f'| {r["seq_len"]} | {cell(r, "compiled_mib", ",.1f")} | '
                 f'{cell(r, "temp_mib", ",.1f")} | {cell(r, "compile_s", ".0f")} | '
                 f'{cell(r, "peak_mib", ",.1f")} | {cell(r, "step_s", ".1f")} | '
                 f'{cell(r, "loss", ".3f")} |')
  lines += ['', 'XLA MiB: memory analysis of the compiled step, arguments + outputs - donated '
            'aliases + temporaries. A row with a step time ran one train step; the others were '
            'compiled only.', 'peak RSS growth: ru_maxrss after the step minus before setup, '
            'compilation included. peak device MiB: the device\'s peak_bytes_in_use.']
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  del argv
  if _ONE.value is not None:
    print(json.dumps(measure(json.loads(_ONE.value))))
    return
  # Fresh processes only: this one never starts a backend (it would hold GPU memory).
  depth_rows = [run_one(_SEQ_LEN.value, int(n), rev, True)
                for n in _DEPTHS.value for rev in (False, True)]  # --depths= (empty): none
  long_rows = [run_one(int(t), _LONG_LAYERS.value, True, False) for t in _LONG_LENGTHS.value]
  fits = [r for r in long_rows if r['status'] == 'ok' and r['compiled_mib'] <= _BUDGET_GIB.value * 1024]
  if fits:
    longest = max(fits, key=lambda r: r['seq_len'])
    long_rows[long_rows.index(longest)] = run_one(longest['seq_len'], _LONG_LAYERS.value, True, True)
  text = report(depth_rows, long_rows)
  print(text)
  if _OUT.value:
    benchlib.write(_OUT.value, text, depth_rows + long_rows)
  if not np.isfinite([r.get('loss', 0.0) for r in depth_rows + long_rows]).all():
    sys.exit('a measured step had a non-finite loss')


if __name__ == '__main__':
  app.run(main)
