"""Real tokens per second of a train step, packed rows against one example per row, at LRA Text
lengths (IMDb-like byte lengths).

Examples: --examples byte strings whose lengths follow a lognormal matched to IMDb reviews in bytes
(median 960, mean 1300: mu = ln 960, sigma^2 = 2 ln(1300 / 960)), at least 10 bytes, random ids.
For each --seq_lens value and --families family it builds configs/lra.py:text (the CPU-sized
classifier, CLS pooling) with and without `pack` (task.max_segments examples per row, first-fit
by grain), jits the trainer's train step, and times --steps steps (after one warm-up step) over
batches the task makes from those examples. Real tokens are the non-pad tokens (segment id > 0);
tokens/s = real tokens in the timed batches / wall time. Both settings run the same rows per step
(--batch), so the gain is the rows' fill.

Command:
  .venv/bin/python experiments/bench/packing.py [--seq_lens=4000,1000] [--families=dense,linear]
      [--batch=2] [--steps=2] [--layers=1] [--out=experiments/results/packing_cpu]
Prints markdown (machine, versions, one row per length x family x packing) and writes <out>.md/.json.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

from efflong import config as config_lib  # pylint: disable=g-import-not-at-top
from efflong.tasks import lra  # pylint: disable=g-import-not-at-top
from efflong.train import sharding, trainer  # pylint: disable=g-import-not-at-top

_CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'lra.py'
MEDIAN, MEAN = 960.0, 1300.0  # IMDb review bytes (approximate)

_SEQ_LENS = flags.DEFINE_list('seq_lens', ['4000', '1000'], 'task.seq_len values.')
_FAMILIES = flags.DEFINE_list('families', ['dense', 'linear'], 'Attention families.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Rows per step (packed or not).')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed steps after one warm-up step.')
_LAYERS = flags.DEFINE_integer('layers', 1, 'Layers (the CPU config has 2; the gain is per layer).')
_EXAMPLES = flags.DEFINE_integer('examples', 400, 'Examples drawn.')
_OUT = flags.DEFINE_string('out', 'experiments/results/packing_cpu', 'Report path, no suffix.')


def imdb_like(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """n records of random byte ids (1..256) with lognormal lengths (median 960, mean 1300)."""
  rng = np.random.default_rng(seed)
  sigma = math.sqrt(2 * math.log(MEAN / MEDIAN))
  lengths = np.maximum(10, rng.lognormal(math.log(MEDIAN), sigma, n).astype(int))
  return [{'inputs': rng.integers(1, 257, n_).astype(np.int32), 'label': np.int32(i % 2)}
          for i, n_ in enumerate(lengths)]


def measure(seq_len: int, family: str, pack: bool, records: list) -> dict:
  """One point: real tokens/s and row fill of the train step."""
  config = config_lib.load_module(str(_CONFIG)).get_config(
      f'text,attention={family}' + (',pack' if pack else ''))
  config.task.seq_len = seq_len
  config.train.batch_size = _BATCH.value
  config.model.num_layers = _LAYERS.value
  # family_kw depends on the length: rebuild it at this seq_len
  length = seq_len + (config.task.max_segments if config.model.pooling == 'cls' else 0)
  config.model.attention_kw.update(config_lib.load_module(str(_CONFIG)).family_kw(
      family, length, max_segments=config.task.max_segments))
  task = lra.LRA(config, source=lambda _, split: records)
  batches = iter(task.train_dataset(0, 1))
  run = trainer.setup(config, jax.devices()[:1])
  state = run.init()
  place = lambda b: sharding.global_batch(b, run.batch_sharding)
  state, _, _ = run.train_step(state, place(next(batches)))  # compile
  jax.block_until_ready(state)
  timed = [next(batches) for _ in range(_STEPS.value)]
  real = sum(int((b['segment_ids'] > 0).sum()) for b in timed)
  examples = sum(int(b['label_weights'].sum()) for b in timed)
  start = time.perf_counter()
  for b in timed:
    state, _, _ = run.train_step(state, place(b))
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  return {'seq_len': seq_len, 'family': family, 'packed': pack,
          'max_segments': config.task.max_segments, 'rows': _BATCH.value * _STEPS.value,
          'examples': examples, 'fill': real / (_BATCH.value * _STEPS.value * seq_len),
          'step_s': seconds / _STEPS.value, 'real_tokens_per_s': real / seconds,
          'examples_per_s': examples / seconds}


def main(argv: list[str]) -> None:
  del argv
  records = imdb_like(_EXAMPLES.value)
  lengths = np.array([len(r['inputs']) for r in records])
  rows = []
  for seq_len in map(int, _SEQ_LENS.value):
    for family in _FAMILIES.value:
      for pack in (False, True):
        rows.append(measure(seq_len, family, pack, records))
        print(rows[-1], flush=True)
  lines = ['# Packing: real tokens/s of a train step, packed vs one example per row (CPU)', '',
           *benchlib.header(str(jax.devices()[0])),
           f'- examples: {len(records)} IMDb-like byte lengths (lognormal, median {MEDIAN:g}, '
           f'mean {MEAN:g}): drawn median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, '
           f'max {lengths.max()}; truncated to seq_len',
           f'- model: configs/lra.py:text CPU default (d_model 128, 4 heads, CLS pooling) with '
           f'{_LAYERS.value} layer(s), {_BATCH.value} rows per step, {_STEPS.value} timed steps after a warm-up step',
           f'- load average at the end: {os.getloadavg()[0]:.1f} (the machine is shared)', '',
           '| seq_len | family | packed | examples/row | fill | s/step | real tokens/s | '
           'examples/s | gain |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    base = next(x for x in rows if x['seq_len'] == r['seq_len'] and x['family'] == r['family']
                and not x['packed'])
    lines.append(f"| {r['seq_len']} | {r['family']} | {'yes (S=%d)' % r['max_segments'] if r['packed'] else 'no'} "
                 f"| {r['examples'] / r['rows']:.2f} | {r['fill']:.2f} | {r['step_s']:.2f} | "
                 f"{r['real_tokens_per_s']:.0f} | {r['examples_per_s']:.1f} | "
                 f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x |")
  lines += ['', 'fill: real tokens / (rows x seq_len). gain: real tokens/s over the unpacked row '
            'at the same length and family. Few timed steps on a shared machine: at equal fill '
            'a gain is timing noise (packed rows also carry S CLS slots).']
  benchlib.emit(_OUT.value, lines, rows)


if __name__ == '__main__':
  app.run(main)
