"""The duplication task of Reformer (Kitaev, Kaiser, Levskaya 2020, section 5 and Table 2).

Sequences 0w0w with w uniform over symbols 1..127; next-token prediction scored on the second w.
The paper trains 1-layer models at length 1024 (|w| = 511); this default is a CPU-sized version
that a dense model learns in minutes, and `seq_len=...` scales it up.

Command (the default experiment of ./launch.sh):
  python -m efflong.main --config=configs/duplication.py --workdir=runs/duplication
Expected on a 2-core CPU: eval/accuracy 0.9995 (second-half token accuracy; 0.98 of sequences
copied whole) after the 1500 default steps, in under 3 minutes
(experiments/results/duplication_default.md).

Arguments (comma separated, e.g. `configs/duplication.py:attention=dense,seq_len=256,smoke`):
  attention   attention family (default dense)
  seq_len     length L of 0w0w, even (default 64: |w| = 31)
  layers      number of layers (default 2)
  smoke       tiny model, a few steps: what the tests run
Sweep (`./launch.sh sweep --config=configs/duplication.py:smoke`): seq_len x layers.
"""

from __future__ import annotations

import ml_collections

from efflong import config as config_lib

ARGS = dict(attention='dense', seq_len=64, layers=2, smoke=False)


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, ARGS)
  c = config_lib.base('duplication')
  c.task.seq_len = args['seq_len']
  c.task.vocab_size = 128
  config_lib.set_attention(c, args['attention'])

  c.model.kind = 'lm'
  c.model.num_layers = args['layers']
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.d_ff = 256

  c.train.steps = 1500
  c.train.batch_size = 32
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.eval.steps = 4
  c.eval.batch_size = 64

  if args['smoke']:
    c.model.d_model, c.model.num_heads, c.model.d_ff = 32, 2, 64
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 6, 8, 2
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 3
    c.eval.steps, c.eval.batch_size = 1, 8
  return c


def get_sweep(arg: str = '') -> list[dict]:
  """seq_len x depth: how much harder copying gets with distance, and whether depth helps."""
  seq_lens = (16, 32) if config_lib.parse_arg(arg, ARGS)['smoke'] else (64, 128, 256)
  return [{'task.seq_len': L, 'model.num_layers': n} for L in seq_lens for n in (1, 2)]
