"""Byte-level language modelling, the setting of Transformer-XL (Dai et al. 2019, Table 2: enwik8).

A decoder predicts the next byte (256 symbols) of a contiguous text stream; rows continue from batch
to batch (efflong/tasks/bytes_lm.py). The result is eval/bits_per_byte on the valid split (the
paper's bpc on enwik8: 0.99 for its 24-layer model); eval/loss is the same in nats. The default
corpus is the Python standard library's source (offline, cached at first use); `corpus=PATH` takes
enwik8, enwik8.zip or any byte file, split 90% / 5% / 5% (enwik8: the standard 90M / 5M / 5M).
This default is a CPU-sized 2-layer model (d_model 128, 4 heads, d_ff 512) with dense attention and
no segment memory, 2000 steps of 16 x 64 bytes: 2.660 eval bits per byte (the fp32 row of
experiments/results/compression.md, whose compressions and distilled students start from it). The
same model with attention=xl reaches 2.534 eval bits per byte without memory
and 2.441 with mem_len=64 (the xl sweep; experiments/results/xl_bytes.md).

Command:
  python -m efflong.main --config=configs/bytes_lm.py --workdir=runs/bytes_lm
  python -m efflong.main --config=configs/bytes_lm.py:corpus=/data/enwik8.zip --workdir=runs/enwik8
Distillation (efflong/compress/distill.py): a narrower student taught by the run above:
  python -m efflong.main --config=configs/bytes_lm.py:d_model=64,distill=runs/bytes_lm \
      --workdir=runs/bytes_lm_kd

Arguments (comma separated, e.g. `configs/bytes_lm.py:attention=local,seq_len=256,smoke`):
  attention   attention family (default dense); its hyper-parameters come from `family_kw` below
  seq_len     segment length T (default 64)
  layers      number of layers (default 2)
  d_model     model width, with d_ff = 4 * d_model (default 0: d_model 128 and d_ff 512; with
              smoke 32 and 64); the heads stay 4 (smoke: 2)
  distill     a trained run's workdir: distil from it as the teacher (config.distill; temperature
              and alpha by --config.distill.temperature / .alpha, default 2.0 and 0.5)
  corpus      'stdlib' (default) or the path of a byte file (enwik8, enwik8.zip, ...)
  mem_len     Transformer-XL's segment memory (default 0); needs attention=xl (which also turns
              absolute positions off); `--config.eval.mem_len=N` evaluates with a longer one
  xl          selects the XL sweep; no effect on the config
  smoke       tiny model, a few steps: what the tests run (the corpus stays as given)
Sweeps (`./launch.sh sweep --config=configs/bytes_lm.py:<arg>`):
  no arg: one point per decoder family (dense, local, lsh, linear, performer, xl) at the arg's
    seq_len, compared by eval/bits_per_byte.
  xl: the same XL model without memory and with mem_len = seq_len (training and evaluation).
"""

from __future__ import annotations

import ml_collections

from efflong import config as config_lib

ARGS = dict(attention='dense', seq_len=64, layers=2, d_model=0, corpus='stdlib', mem_len=0,
            distill='', smoke=False, xl=False)
CURVES = ('eval/bits_per_byte', 'train/bits_per_byte')  # what a sweep plots against step
FAMILIES = ('dense', 'local', 'lsh', 'linear', 'performer', 'xl')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, ARGS)
  c = config_lib.base('bytes_lm')
  c.task.seq_len = args['seq_len']
  c.task.vocab_size = 256
  c.task.corpus = args['corpus']
  c.task.cache_dir = ''  # '': ~/.cache/efflong/bytes_lm/stdlib-<python version> (stdlib only)
  config_lib.set_attention(c, args['attention'])
  c.model.attention_kw.update(family_kw(args['attention'], args['seq_len']))

  c.model.kind = 'lm'
  if args['attention'] == 'xl':  # relative positions only, so that a memory lines up
    c.model.positions = 'none'
  c.model.mem_len = args['mem_len']
  c.model.num_layers = args['layers']
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.d_ff = 512
  c.distill.teacher_workdir = args['distill']

  c.train.steps = 2000
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 200
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.eval.steps = 64
  c.eval.batch_size = 16

  if args['smoke']:
    config_lib.smoke(c)
  if args['d_model']:  # after smoke: a width given is the width used
    c.model.d_model, c.model.d_ff = args['d_model'], 4 * args['d_model']
  return c


def family_kw(name: str, seq_len: int) -> dict:
  """Each family's hyper-parameters at this segment length: local and lsh see about T/4 bytes."""
  return {
      'local': dict(window=max(1, seq_len // 4)),
      'lsh': dict(bucket_size=max(1, seq_len // 4)),
  }.get(name, {})


def get_sweep(arg: str = '') -> list[dict]:
  """One point per decoder family, or with `xl` the XL model without and with memory; the rest of
  the config as `arg` sets it."""
  args = config_lib.parse_arg(arg, ARGS)  # refuses an unknown argument before any point trains
  if args['xl']:
    return [{'arg': f'attention=xl,mem_len={m}'} for m in (0, args['seq_len'])]
  return [{'arg': f'attention={name}'} for name in FAMILIES]
