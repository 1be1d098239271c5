"""How much a causal LSH output at position t depends on the tokens after t, per LSH form.

Reformer's chunked causal form (Kitaev et al. 2020, section 2) sorts the whole sequence by bucket
and cuts it into chunks, so a future token's bucket moves the chunk boundaries, and with them which
past keys a query sees. efflong's default causal form (the band, efflong/attention/lsh.py) attends
to a query's most recent same-bucket keys, which no future token can change. Measured here:

- attention: lsh.attend alone, B = 1, T = --length, N = 4, H = 32, causal, n_hashes 2, bucket_size
  --bucket_size, one set of rotations. For each cut t in --cuts, every token after t is replaced
  (fresh random queries/keys and values); "moved" is the fraction of positions <= t whose output
  changed by more than 1e-5 of the largest output, "largest move" the largest change at <= t
  divided by the largest output.
- model: the duplication LM of configs/duplication.py:attention=lsh (2 layers, d_model 128, random
  initial weights), T = 64, bucket_size 8; tokens after t replaced by other random symbols; the same
  two numbers on the logits at <= t.

Command:
  ./launch.sh bench lsh_causality [--length=512] [--bucket_size=32] [--cuts=64,128,256,384,448]
      [--out=experiments/results/lsh_causality_cpu]
Prints markdown; with --out also writes <out>.md and <out>.json.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import benchlib
from efflong import config as config_lib
from efflong import models
from efflong.attention import Mask, lsh

_LENGTH = flags.DEFINE_integer('length', 512, 'T of the attention-level probe.')
_BUCKET = flags.DEFINE_integer('bucket_size', 32, 'bucket_size of the attention-level probe.')
_CUTS = flags.DEFINE_list('cuts', ['64', '128', '256', '384', '448'], 'Positions t (attention).')
_OUT = flags.DEFINE_string('out', None, 'Writes <out>.md and <out>.json.')

_CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'duplication.py'
FORMS = {  # name: lsh hyper-parameters
    'band (default: paper masks, strictly causal)': dict(),
    'chunked, paper masks': dict(causal_band=False),
    'chunked, across buckets, duplicates (efflong before 2026-12)': dict(
        causal_band=False, attend_across_buckets=True, allow_duplicates=True),
}


def leak(fn: Callable[[np.ndarray], np.ndarray], base: np.ndarray, changed: Callable[[int],
         np.ndarray], cuts: list[int]) -> dict[str, float]:
  """Runs fn on base and on changed(t) per cut; fraction of positions <= t that moved, and the
  largest move over the largest base output (outputs [T, ...])."""
  ref = np.asarray(fn(base))
  scale = np.abs(ref).max()
  moved, largest = [], 0.0
  for t in cuts:
    diff = np.abs(np.asarray(fn(changed(t))) - ref)[:t + 1].reshape(t + 1, -1).max(-1)
    moved.extend(diff > 1e-5 * scale)
    largest = max(largest, float(diff.max() / scale))
  return {'moved': float(np.mean(moved)), 'largest_move': largest}


def attention_probe(kw: dict[str, Any]) -> dict[str, float]:
  t, n, h = _LENGTH.value, 4, 32
  rng = np.random.default_rng(0)
  x, x2 = rng.standard_normal((2, 2, t, n, h)).astype(np.float32)   # (queries, values) twice
  fn = jax.jit(lambda x: lsh.attend(x[0][None], x[0][None], x[1][None], mask=Mask(causal=True),
                                    rng=jax.random.key(1), n_hashes=2, bucket_size=_BUCKET.value,
                                    **kw)[0])
  later = lambda c: (np.arange(t) > c)[None, :, None, None]
  return leak(fn, x, lambda c: np.where(later(c), x2, x), [int(c) for c in _CUTS.value])


def model_probe(kw: dict[str, Any]) -> dict[str, float]:
  config = config_lib.load_module(str(_CONFIG)).get_config('attention=lsh')
  config.model.attention_kw.update(kw)
  model = models.build(config, rngs=nnx.Rngs(0))
  t = config.task.seq_len
  rng = np.random.default_rng(1)
  tokens, other = rng.integers(1, config.task.vocab_size, (2, t), dtype=np.int32)
  fn = nnx.jit(lambda m, x: m({'inputs': x[None]})[0])
  return leak(lambda x: fn(model, jnp.asarray(x)), tokens,
              lambda c: np.where(np.arange(t) > c, other, tokens), [8, 16, 32, 48, 56])


def main(argv: list[str]) -> None:
  del argv
  rows = []
  for name, kw in FORMS.items():
    rows.append({'form': name, 'level': 'attention', **attention_probe(kw)})
    rows.append({'form': name, 'level': 'model', **model_probe(kw)})
  lines = ['# Causal LSH: do outputs at t depend on tokens after t?', '',
           *benchlib.header(jax.devices()[0].device_kind), '',
           f'Attention: T = {_LENGTH.value}, bucket_size {_BUCKET.value}, 2 hash rounds, cuts '
           f'{",".join(_CUTS.value)}. Model: the duplication LSH LM (T = 64, bucket_size 8, random '
           'weights), cuts 8,16,32,48,56. See the docstring of experiments/bench/lsh_causality.py.',
           '', '| form | level | positions <= t moved | largest move / largest output |',
           '|---|---|---:|---:|']
  lines += [f'| {r["form"]} | {r["level"]} | {r["moved"]:.1%} | {r["largest_move"]:.3g} |'
            for r in rows]
  benchlib.emit(_OUT.value, lines, rows)


if __name__ == '__main__':
  app.run(main)
