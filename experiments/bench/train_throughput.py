"""Tokens/s and peak memory of one dense train step of the duplication LM, per sequence length.

For each --seq_lens value it builds configs/duplication.py at that length with
batch = --batch_tokens // seq_len, jits efflong.train.trainer.make_train_step with the trainer's
shardings and donation, and times --steps steps (wall clock, jax.block_until_ready) after 2 warm-up
steps on one fixed batch of the task. Each length runs in a fresh subprocess (--one=L), so its peak
memory is its own: peak_bytes_in_use where the device reports it (GPU), else the growth of the
process's peak RSS (CPU). XLA's compiled memory analysis of the step is reported beside it.

Command:
  ./launch.sh bench train_throughput [--seq_lens=256,1024,4096] [--batch_tokens=16384] [--steps=10]
      [--layers=N] [--d_model=D] [--dtype=float32|bfloat16]
  (or .venv/bin/python experiments/bench/train_throughput.py with the same flags)
Prints markdown: the machine and versions, then one table row per length.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import flax
import jax
import jaxlib
import ml_collections
import optax
from absl import app, flags

from efflong import config as config_lib
from efflong.train import sharding, trainer

_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'duplication.py'
_WARMUP_STEPS = 2
_MIB = 2**20
_PEAK_NOTES = {
    'peak RSS growth MiB': 'peak RSS growth: ru_maxrss after the timed steps minus before setup, '
                           'compilation included.',
    'peak device MiB': "peak device MiB: the device's peak_bytes_in_use after the timed steps.",
}

_SEQ_LENS = flags.DEFINE_list('seq_lens', ['256', '1024', '4096'], 'Sequence lengths to measure.')
_BATCH_TOKENS = flags.DEFINE_integer(
    'batch_tokens', 16384, 'Tokens per step (batch = batch_tokens // seq_len, at least 1).')
_STEPS = flags.DEFINE_integer('steps', 10, f'Timed steps, after {_WARMUP_STEPS} warm-up steps.')
_LAYERS = flags.DEFINE_integer('layers', None, 'Layers (default: the duplication config).')
_D_MODEL = flags.DEFINE_integer('d_model', None, 'Width (default: the duplication config); heads '
                                'and d_ff stay as configured.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype; parameters stay float32.')
_ONE = flags.DEFINE_integer('one', None, 'Internal: measure this one length, print it as JSON.')


def make_config(seq_len: int) -> ml_collections.ConfigDict:
  """configs/duplication.py at seq_len, with this benchmark's batch, size and dtype."""
  config = config_lib.load_module(str(_CONFIG_FILE)).get_config(f'seq_len={seq_len}')
  config.train.batch_size = max(1, _BATCH_TOKENS.value // seq_len)
  config.model.num_layers = _LAYERS.value or config.model.num_layers
  config.model.d_model = _D_MODEL.value or config.model.d_model
  config.model.dtype = _DTYPE.value
  return config


def measure(seq_len: int) -> dict:
  """Compiles, warms up and times the train step at seq_len in this process; returns its row."""
  device = jax.devices()[0]
  rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  config = make_config(seq_len)

  run = trainer.setup(config)  # the trainer's own mesh, shardings and jit'd step
  state = run.init()
  batch = sharding.global_batch(next(iter(run.task.train_dataset(0, 1))), run.batch_sharding)

  print(f'seq_len {seq_len}: compiling...', file=sys.stderr, flush=True)
  start = time.perf_counter()
  step = run.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  mem = step.memory_analysis()
  # Donated state is both an argument and an output: count it once.
  compiled_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes)

  for _ in range(_WARMUP_STEPS):
    state, _, scalars = step(state, batch)
  jax.block_until_ready((state, scalars))
  times = []  # per step, so that the best step shows the speed without other load on the machine
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, _, scalars = step(state, batch)
    jax.block_until_ready((state, scalars))
    times.append(time.perf_counter() - start)
  step_s = sum(times) / len(times)

  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    peak_name, peak_bytes = 'peak device MiB', stats['peak_bytes_in_use']
  else:
    rss_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_name, peak_bytes = 'peak RSS growth MiB', (rss_after_kib - rss_before_kib) * 1024
  tokens = batch['inputs'].size
  return {
      'seq_len': seq_len, 'batch': batch['inputs'].shape[0], 'tokens': tokens,
      'step_ms': step_s * 1e3, 'best_ms': min(times) * 1e3, 'tokens_per_s': tokens / step_s,
      'compile_s': compile_s, 'compiled_mib': compiled_bytes / _MIB,
      'peak_name': peak_name, 'peak_mib': peak_bytes / _MIB,
      'device': f'{jax.default_backend()}: {len(jax.devices())} x {device.device_kind}',
  }


def main(argv: list[str]) -> None:
  del argv
  if _ONE.value is not None:
    print(json.dumps(measure(_ONE.value)))
    return
  # One fresh process per length; this one never starts a backend (it would hold GPU memory).
  rows = []
  for seq_len in _SEQ_LENS.value:
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], f'--one={seq_len}'],
                           stdout=subprocess.PIPE, text=True, check=True)
    rows.append(json.loads(child.stdout.splitlines()[-1]))

  m = make_config(int(_SEQ_LENS.value[0])).model
  print(f'## Dense train step, duplication LM: {m.num_layers} layers, d_model {m.d_model}, '
        f'{m.num_heads} heads, d_ff {m.d_ff}, {m.dtype}\n')
  print(f'- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}')
  print(f'- machine: {platform.platform()}, {len(os.sched_getaffinity(0))} CPU cores available')
  print(f'- device: {rows[0]["device"]}')
  print(f'- versions: python {platform.python_version()}, jax {jax.__version__}, jaxlib '
        f'{jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}')
  print(f'- timing: {_STEPS.value} steps after {_WARMUP_STEPS} warm-up steps, '
        f'~{_BATCH_TOKENS.value} tokens per step\n')
  print(f'| seq_len | batch | tokens/step | step ms | best step ms | tokens/s | compile s | '
        f'compiled MiB | {rows[0]["peak_name"]} |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f'| {r["seq_len"]} | {r["batch"]} | {r["tokens"]} | {r["step_ms"]:.1f} | '
          f'{r["best_ms"]:.1f} | {r["tokens_per_s"]:,.0f} | {r["compile_s"]:.1f} | '
          f'{r["compiled_mib"]:,.1f} | {r["peak_mib"]:,.1f} |')
  print('\nstep ms, tokens/s: mean over the timed steps; best step ms: the fastest of them.\n'
        'compiled MiB: XLA memory analysis of the step, arguments + outputs - donated aliases + '
        f'temporaries.\n{_PEAK_NOTES[rows[0]["peak_name"]]}')


if __name__ == '__main__':
  app.run(main)
