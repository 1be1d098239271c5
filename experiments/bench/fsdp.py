"""FSDP measured: per-device bytes of the parameters and the optimizer state against mesh.fsdp.

The duplication LM (configs/duplication.py, seq_len 64) widened until its parameters dominate
(--layers 4, --d_model 512, 8 heads, d_ff 4 x d_model: about 12.6M parameters, AdamW: two moments
per parameter), batch 8, float32, is set up by the trainer on the 8 fake CPU devices with mesh
data = 8 / f, fsdp = f, model = 1 for each --fsdp size f. For each:
- held: the state the trainer's init creates (run.init(), executed), as the bytes of the shards
  that device 0 holds (jax.Array.addressable_shards), for the parameters and for the optimizer
  state;
- compiled: XLA's memory analysis of one compiled train step on device 0 (the step is compiled,
  never run): its arguments (the state and the batch), temporaries, outputs - donated aliases.

Check: held(1) / held(f) >= 0.9 f for the parameters + optimizer state (what is not sharded over
fsdp: the step counter and the parameters without an `embed` axis, the biases of the feed-forward's
first layer and of the output head).

Command:
  ./launch.sh bench fsdp [--fsdp=1,2,4,8] [--layers=4] [--d_model=512]
      [--out=experiments/results/fsdp_cpu]
  (or .venv/bin/python experiments/bench/fsdp.py with the same flags)
Prints markdown; with --out also writes <out>.md and the rows as <out>.json.
"""

from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

# pylint: disable=g-import-not-at-top,wrong-import-position (XLA_FLAGS before jax)
import pathlib
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags

import benchlib
from efflong import config as config_lib
from efflong.train import sharding, trainer

_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'duplication.py'
_MIB = 2**20

_FSDP = flags.DEFINE_list('fsdp', ['1', '2', '4', '8'], 'mesh.fsdp sizes (data: the rest of 8).')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Layers.')
_D_MODEL = flags.DEFINE_integer('d_model', 512, 'Width; 8 heads, d_ff 4 x d_model.')
_OUT = flags.DEFINE_string('out', None, 'Write <out>.md and <out>.json.')


def make_config(fsdp: int) -> ml_collections.ConfigDict:
  """configs/duplication.py with this benchmark's model on mesh data = 8 / fsdp x fsdp."""
  c = config_lib.load_module(str(_CONFIG_FILE)).get_config('seq_len=64')
  d = _D_MODEL.value
  c.model.update(num_layers=_LAYERS.value, d_model=d, num_heads=8, d_ff=4 * d)
  c.train.batch_size = 8
  c.mesh.update(data=-1, fsdp=fsdp, model=1)
  return c


def device0_bytes(tree: Any) -> int:
  """Bytes of the shards of tree's arrays that the first device holds."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards
             if s.device == device)


def measure(fsdp: int) -> dict[str, Any]:
  """The held and compiled per-device bytes at this fsdp size."""
  print(f'fsdp {fsdp}...', file=sys.stderr, flush=True)
  start = time.perf_counter()
  run = trainer.setup(make_config(fsdp))
  state = run.init()
  batch = sharding.global_batch(next(iter(run.task.train_dataset(0, 1))), run.batch_sharding)
  mem = run.train_step.lower(state, batch).compile().memory_analysis()
  params, opt = device0_bytes(state.params), device0_bytes(state.opt_state)
  row = dict(fsdp=fsdp, data=8 // fsdp, mesh=dict(run.mesh.shape),
             parameters=sum(a.size for a in jax.tree.leaves(state.params)),
             params_mib=params / _MIB, opt_state_mib=opt / _MIB, held_mib=(params + opt) / _MIB,
             step_arguments_mib=mem.argument_size_in_bytes / _MIB,
             step_temp_mib=mem.temp_size_in_bytes / _MIB,
             step_total_mib=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                             - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / _MIB,
             seconds=time.perf_counter() - start)
  del state
  return row


def report(rows: list[dict[str, Any]]) -> tuple[list[str], bool]:
  base = rows[0]
  device = f'{jax.default_backend()}: {len(jax.devices())} x {jax.devices()[0].device_kind}'
  d = _D_MODEL.value
  lines = ['## FSDP: per-device bytes of parameters and optimizer state against mesh.fsdp\n',
           *benchlib.header(device),
           f'- model: duplication LM, seq_len 64, {_LAYERS.value} layers, d_model {d}, 8 heads, '
           f'd_ff {4 * d}, {base["parameters"]:,} parameters, float32, AdamW; batch 8; mesh '
           'data = 8 / fsdp, model 1',
           '- held: the bytes of the shards device 0 holds after the trainer\'s init; compiled: '
           'XLA\'s memory analysis of one train step on device 0 (compiled, not run)', '',
           '| fsdp | data | params MiB | opt state MiB | params + opt MiB | held(1) / held(f) | '
           'step arguments MiB | step temp MiB | step total MiB |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  checks, ok = [], True
  for r in rows:
    ratio = base['held_mib'] / r['held_mib']
    lines.append(f'| {r["fsdp"]} | {r["data"]} | {r["params_mib"]:,.2f} | '
                 f'{r["opt_state_mib"]:,.2f} | {r["held_mib"]:,.2f} | {ratio:.2f} | '
                 f'{r["step_arguments_mib"]:,.2f} | {r["step_temp_mib"]:,.2f} | '
                 f'{r["step_total_mib"]:,.2f} |')
    if r['fsdp'] > 1:
      good = ratio >= 0.9 * r['fsdp'] / base['fsdp']
      ok &= good
      checks.append(f'- {"ok" if good else "FAILED"}: fsdp {r["fsdp"]}: held(1) / held(f) = '
                    f'{ratio:.2f} >= 0.9 x {r["fsdp"] // base["fsdp"]}')
  lines += ['', 'The step\'s temporaries do not fall as 1 / fsdp: they hold the activations and '
            'the parameters and gradients gathered whole for the computation.', '',
            '### Checks (parameters + optimizer state fall ~1/fsdp)', '', *checks]
  return lines, ok


def main(argv: list[str]) -> None:
  del argv
  rows = [measure(int(f)) for f in _FSDP.value]
  lines, ok = report(rows)
  benchlib.emit(_OUT.value, lines, rows)
  if not ok:
    sys.exit('a check failed')


if __name__ == '__main__':
  app.run(main)
