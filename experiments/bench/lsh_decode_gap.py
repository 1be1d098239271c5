"""What a trained causal LSH model loses when it must generate: parallel eval vs token by token.

Training and the trainer's evaluation run the whole sequence at once. Generation cannot: the logits
at position t may depend only on the tokens up to t. For a strictly causal form (the band, LSH's
default) that changes nothing, and the cached decoder (model.prefill / decode_step) gives the
parallel logits. Reformer's chunked form (causal_band=False) is not causal: a later token's bucket
moves the chunk boundaries of the sort, so its parallel evaluation sees a little of the future and
no cache can reproduce it. Measured per trained run, on its eval batches (the run's eval attention
settings, e.g. 4 hash rounds for the duplication default):

- parallel: the model over the whole sequence (what eval/* in metrics.jsonl reports);
- prefix: the logits at every t from the model run on the prefix alone: the tokens after t replaced
  by token 0 and given segment id 0, so the output at t is a function of tokens <= t only (what
  generation without a cache computes); also its largest logit change against parallel and the
  share of scored positions whose argmax changed;
- cached: model.prefill over the sequence (the cached decoder's state update, token by token
  inside); only where the family's settings decode (the chunked form refuses).

The runs, trained first (4000 / 2000 steps; each run's config.json records the rest):
  python -m efflong.main --config=configs/duplication.py:attention=lsh --workdir=runs/duplication
  python -m efflong.main --config=configs/duplication.py:attention=lsh \
      --config.model.attention_kw.causal_band=False --workdir=runs/dup_lsh_chunked
  python -m efflong.main --config=configs/bytes_lm.py:attention=lsh --workdir=runs/bytes_lsh_band
  python -m efflong.main --config=configs/bytes_lm.py:attention=lsh \
      --config.model.attention_kw.causal_band=False --workdir=runs/bytes_lsh_chunked

Command:
  ./launch.sh bench lsh_decode_gap --workdirs=runs/duplication,runs/dup_lsh_chunked,\
runs/bytes_lsh_band,runs/bytes_lsh_chunked --out=experiments/results/lsh_decode_gap
Prints markdown; with --out also writes <out>.md and <out>.json.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import benchlib
from efflong import errors, tasks
from efflong.infer import generate
from efflong.train import trainer

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Training runs (lm, lsh attention).')
_BATCHES = flags.DEFINE_integer('max_batches', 4, 'Eval batches per run (at most).')
_ROWS = flags.DEFINE_integer('rows', 512, 'Prefix rows per forward call.')
_OUT = flags.DEFINE_string('out', None, 'Writes <out>.md and <out>.json.')

Sums = dict[str, tuple[float, float]]


def prefix_logits(forward, inputs: np.ndarray, rows: int) -> np.ndarray:
  """[B, T, V] logits where position t sees only inputs[:, :t + 1] (later tokens: 0, segment 0)."""
  b, t = inputs.shape
  keep = np.arange(t)[None, :] <= np.arange(t)[:, None]                    # [t (cut), T]
  tokens = np.where(keep[:, None], inputs[None], 0).reshape(t * b, t)       # [cut * B, T]
  segments = np.broadcast_to(keep[:, None], (t, b, t)).reshape(t * b, t).astype(np.int32)
  out = [np.asarray(forward({'inputs': tokens[i:i + rows], 'segment_ids': segments[i:i + rows]}))
         for i in range(0, t * b, rows)]
  logits = np.concatenate(out).reshape(t, b, t, -1)
  return logits[np.arange(t), :, np.arange(t)].transpose(1, 0, 2)           # [B, T, V]


def add(total: Sums, metrics: dict[str, Any]) -> None:
  for name, (s, c) in metrics.items():
    s0, c0 = total.get(name, (0.0, 0.0))
    total[name] = (s0 + float(s), c0 + float(c))


def measure(workdir: str) -> dict[str, Any]:
  config = generate.load_config(workdir)
  model, step = generate.load_model(workdir, config)
  task = tasks.build(config)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda batch: nnx.merge(graphdef, state)(batch))
  kw = {k: v for k, v in trainer.eval_attention_kws(config)['eval'].items() if v is not None}
  cache = model.init_cache(config.eval.batch_size, config.task.seq_len)
  cached = jax.jit(lambda batch, cache: nnx.merge(graphdef, state).prefill(batch, cache)[0])
  refused = ''
  totals: dict[str, Sums] = {'parallel': {}, 'prefix': {}, 'cached': {}}
  for batch in itertools.islice(task.eval_dataset(0, 1), _BATCHES.value):
    inputs = np.asarray(batch['inputs'])
    logits = {'parallel': forward({'inputs': inputs}),
              'prefix': prefix_logits(forward, inputs, _ROWS.value)}
    if not refused:
      try:
        logits['cached'] = cached({'inputs': inputs,
                                   'segment_ids': np.ones_like(inputs, np.int32)}, cache)
      except errors.Error as e:  # the family's settings cannot decode (the chunked form)
        refused = str(e)
    for form, value in logits.items():
      add(totals[form], task.loss_and_metrics(jnp.asarray(value), batch)[1])
    weighted = np.asarray(batch['weights']) > 0
    moved = np.abs(np.asarray(logits['prefix']) - np.asarray(logits['parallel'])).max(-1)
    flipped = logits['prefix'].argmax(-1) != np.asarray(logits['parallel']).argmax(-1)
    add(totals['prefix'], {'largest_logit_change': (moved[weighted].max(), 1.0)})
    add(totals['prefix'], {'argmax_changed': (flipped[weighted].sum(), weighted.sum())})
  row = {'workdir': workdir, 'task': config.task.name, 'step': step, 'eval_attention_kw': kw}
  for form, sums in totals.items():
    row[form] = {k: s / max(c, 1.0) for k, (s, c) in sums.items()} if sums else 'refused'
  row['refused'] = refused
  return row


def main(argv: list[str]) -> None:
  del argv
  rows = [measure(w) for w in _WORKDIRS.value]
  lines = ['# Causal LSH: parallel evaluation vs token-by-token generation', '',
           *benchlib.header(str(jax.devices()[0])),
           '- runs and how they were trained: experiments/bench/lsh_decode_gap.py (docstring); '
           'metrics are means over the first --max_batches eval batches', '',
           '| run | task | lsh form (eval) | metric | parallel | prefix only | cached decode | '
           'prefix - parallel |', '|---|---|---|---|---:|---:|---:|---:|']
  for r in rows:
    kw = r['eval_attention_kw']
    form = ('chunked' if not kw.get('causal_band', True) else 'band') + (
        f", {kw.get('n_hashes')} rounds, bucket {kw.get('bucket_size')}")
    for metric in r['parallel']:
      cached = (f"{r['cached'][metric]:.4f}" if isinstance(r['cached'], dict) else 'refused')
      lines.append(f"| {r['workdir']} | {r['task']} | {form} | {metric} | "
                   f"{r['parallel'][metric]:.4f} | {r['prefix'][metric]:.4f} | {cached} | "
                   f"{r['prefix'][metric] - r['parallel'][metric]:+.5f} |")
    lines.append(f"| {r['workdir']} | {r['task']} | {form} | prefix vs parallel: largest "
                 f"logit change (a batch's, mean over batches), argmax changed | | | | "
                 f"{r['prefix']['largest_logit_change']:.2e}, "
                 f"{r['prefix']['argmax_changed']:.2%} |")
  benchlib.emit(_OUT.value, lines, rows)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdirs')
  app.run(main)
