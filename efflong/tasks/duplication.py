"""The duplication task (Kitaev, Kaiser, Levskaya 2020, "Reformer", section 5).

Each sequence is 0 w 0 w with w drawn uniformly from symbols 1..V-1; the model predicts the next
token and is scored on the second w only, which it can get right only by looking |w| + 1 tokens back.
The paper uses V = 128 and |w| = 511 (length 1024).

With task.fill (our variant, for attention that cannot be causal, e.g. Linformer): the input is
0 w 0 followed by |w| blanks (0), and each blank position predicts its own token of the second w,
which sits L/2 positions earlier in the input; a bidirectional encoder is scored on the blanks.

Examples are generated on the fly: example i of the train stream is a function of (seed, i) only,
so the data order follows from config.seed and the step, and a grain iterator's state (an index)
is all a checkpoint needs to resume it.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np

from efflong import errors
from efflong.tasks import Metrics, local_batch_size, token_metrics

_TRAIN, _EVAL = 0, 1


def make_example(seed: int, stream: int, index: int, seq_len: int, vocab_size: int,
                 fill: bool = False) -> dict:
  """One example of the stream: inputs 0w0w, targets shifted by one, weights on the second w.

  With fill: inputs 0w0 and blanks, targets 0w0w unshifted, weights on the blanks.
  """
  half = seq_len // 2
  w = np.random.default_rng([seed, stream, index]).integers(1, vocab_size, size=half - 1)
  sequence = np.concatenate([[0], w, [0], w]).astype(np.int32)
  weights = np.zeros(seq_len, np.float32)
  if fill:
    weights[half + 1:] = 1.0
    return {'inputs': np.where(weights > 0, 0, sequence).astype(np.int32), 'targets': sequence,
            'weights': weights}
  weights[half:seq_len - 1] = 1.0  # position p predicts token p + 1: the second w.
  return {'inputs': sequence, 'targets': np.append(sequence[1:], 0).astype(np.int32),
          'weights': weights}


class Duplication:
  """Task object for config.task.name = 'duplication' (fields: seq_len, vocab_size, fill)."""

  contiguous_rows = False  # independent examples: no memory carries from one batch to the next

  def __init__(self, config: ml_collections.ConfigDict):
    self.seq_len, self.vocab_size = config.task.seq_len, config.task.vocab_size
    if self.seq_len < 4 or self.seq_len % 2:
      raise errors.Error(f'task.seq_len={self.seq_len} cannot hold 0w0w: it must be even and >= 4.')
    if self.vocab_size < 2:
      raise errors.Error(f'task.vocab_size={self.vocab_size} leaves no symbols for w: it must be '
                         '>= 2.')
    self.fill = bool(config.task.get('fill', False))
    self.seed = config.seed
    self.train_batch, self.eval_batch = config.train.batch_size, config.eval.batch_size
    self.eval_examples = config.eval.steps * config.eval.batch_size

  def _dataset(self, stream: int, size: int, batch: int, process_index: int,
               process_count: int) -> grain.IterDataset:
    # Process p takes examples p, p + P, ...: the global batch at each step is the same set of
    # examples whatever the process count.
    make = lambda i: make_example(self.seed, stream, i, self.seq_len, self.vocab_size, self.fill)
    ds = grain.MapDataset.range(size)[process_index::process_count].map(make)
    return ds.batch(local_batch_size(batch, process_count), drop_remainder=True).to_iter_dataset()

  def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    return self._dataset(_TRAIN, 2**62, self.train_batch, process_index, process_count)

  def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    return self._dataset(_EVAL, self.eval_examples, self.eval_batch, process_index, process_count)

  def target_weights(self, batch: dict) -> jax.Array:
    """[b, T]: batch['weights'], 1 on the positions that predict the second w (with fill: the
    blanks)."""
    return batch['weights']

  def loss_and_metrics(self, outputs: jax.Array, batch: dict) -> tuple[jax.Array, Metrics]:
    return token_metrics(outputs, batch['targets'], self.target_weights(batch))
