"""Long Range Arena (Tay et al. 2020): the data and task classes of its five tasks.

One task class, `LRA`, serves config.task.name in listops, text, retrieval, image and pathfinder:
the examples of `builder.data_source(config.task, split)` (each task module's docstring says its
data and fields), classified by a model of kind 'classifier' (retrieval: 'dual_encoder';
efflong/models/classifier.py).

Task fields read here: seq_len (T: every example is padded to it), truncate (default False: an
example longer than T is an error naming it; True cuts it to its first T tokens, as LRA did for
Text and Retrieval), vocab_size and num_classes (checked against the task module's), pack (default
False; listops and text only) and max_segments (S, default 1; with pack, at most S examples share a
row), eval_split (default 'validation'; 'test' evaluates on the test split).

Batches (numpy, this process's share of config.train.batch_size / eval.batch_size rows):
  inputs [b, T] int32, segment_ids [b, T] (1 on an example's tokens, 0 on padding; packed rows
  1..n, one id per example), positions [b, T] (0.. within each example), labels [b, S] int32 and
  label_weights [b, S] float32 (1 where a slot holds an example). Retrieval: inputs1,
  segment_ids1, positions1, inputs2, segment_ids2, positions2 and labels, label_weights [b, 1].
The model returns [b, S, C] logits; the loss reads slot s of row b when label_weights[b, s] = 1.

Train: endless; each pass over the train split in a new order (grain's shuffle, re-seeded per
pass from config.seed); process p of P takes examples p, p + P, ... of that stream, so the global
batch at a step is the same set of examples for any process count (unpacked). With pack, each
process packs its examples first-fit into rows of T tokens and at most S examples
(grain.experimental.FirstFitPackIterDataset, b bins at a time). The iterator's state (an index,
plus the packer's bins) is checkpointed with the model.
Eval: finite and never packed: the whole eval split once (or its first eval.steps * eval.batch_size
examples when eval.steps > 0), the last batch filled with rows of weight 0 so that no example is
dropped and every process runs the same number of batches.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import grain
import jax
import ml_collections
import numpy as np

from efflong import errors
from efflong.tasks import Metrics, local_batch_size, token_metrics
from efflong.tasks.lra import builder

TASKS = ('listops', 'text', 'retrieval', 'image', 'pathfinder')
PACKABLE = ('listops', 'text')
Record = dict[str, np.ndarray]


def fit(tokens: np.ndarray, seq_len: int, truncate: bool, where: str) -> np.ndarray:
  """tokens [L] -> [min(L, seq_len)] int32; longer than seq_len without truncate is an error."""
  if len(tokens) > seq_len and not truncate:
    raise errors.Error(f'{where} has {len(tokens)} tokens, more than task.seq_len={seq_len}; set '
                       'task.truncate=True to cut it, or a longer task.seq_len.')
  return np.asarray(tokens[:seq_len], np.int32)


def pad(tokens: np.ndarray, seq_len: int, suffix: str = '') -> Record:
  """One example [L <= T] as an unpacked row: inputs, segment_ids, positions [T] (0 on padding)."""
  n = len(tokens)
  real = np.arange(seq_len) < n
  return {f'inputs{suffix}': np.pad(tokens, (0, seq_len - n)).astype(np.int32),
          f'segment_ids{suffix}': real.astype(np.int32),
          f'positions{suffix}': np.where(real, np.arange(seq_len), 0).astype(np.int32)}


def empty_row(seq_len: int, pair: bool) -> Record:
  """A row of weight 0 (fills an eval batch): padding only."""
  row = {}
  for suffix in ('1', '2') if pair else ('',):
    row.update(pad(np.zeros(0, np.int32), seq_len, suffix))
  return {**row, 'labels': np.zeros(1, np.int32), 'label_weights': np.zeros(1, np.float32)}


class LRA:
  """Task object for config.task.name in TASKS (see the module docstring)."""

  contiguous_rows = False  # independent examples

  def __init__(self, config: ml_collections.ConfigDict,
               source: Any = None):
    """source: (task config, split) -> records; default builder.data_source (tests pass one)."""
    task = config.task
    if task.name not in TASKS:
      raise errors.Error(f'task.name={task.name!r} is not an LRA task; valid: {list(TASKS)}.')
    self.task, self.name = task, task.name
    module = builder.task_module(task.name)
    for field, value in (('vocab_size', module.VOCAB_SIZE), ('num_classes', module.NUM_CLASSES)):
      if task.get(field) != value:
        raise errors.Error(f'task.{field}={task.get(field)} does not match {task.name} '
                           f'({value}).')
    self.num_classes = module.NUM_CLASSES
    self.seq_len, self.truncate = task.seq_len, bool(task.truncate)
    self.pack, self.max_segments = bool(task.pack), task.max_segments
    self.pair = task.name == 'retrieval'
    if self.pack and task.name not in PACKABLE:
      raise errors.Error(f'task.pack=True applies to {list(PACKABLE)}, not {task.name!r}.')
    if self.pack and self.max_segments < 2:
      raise errors.Error(f'task.pack=True needs task.max_segments >= 2 (examples per row); got '
                         f'{self.max_segments}.')
    if not self.pack and self.max_segments != 1:
      raise errors.Error(f'task.max_segments={self.max_segments} applies to packed rows; set '
                         'task.pack=True or max_segments=1.')
    if config.model.kind != ('dual_encoder' if self.pair else 'classifier'):
      raise errors.Error(f"task {task.name!r} needs model.kind="
                         f"{'dual_encoder' if self.pair else 'classifier'!r}; got "
                         f'{config.model.kind!r}.')
    self.eval_split = task.eval_split
    if self.eval_split not in ('validation', 'test'):
      raise errors.Error(f"task.eval_split={self.eval_split!r}; valid: 'validation', 'test'.")
    self.seed = config.seed
    self.train_batch, self.eval_batch = config.train.batch_size, config.eval.batch_size
    self.eval_steps = config.eval.get('steps') or 0
    self._source = source or builder.data_source

  def records(self, split: str) -> Sequence[Record]:
    """The split's raw records (variable length)."""
    return self._source(self.task, split)

  def example(self, record: Record, index: int, split: str, packed: bool = False) -> Record:
    """A record as a row (packed=False) or as an unpadded example for the packer: inputs [L],
    label [1]. Errors name the example: a label out of range, too many tokens."""
    where = f'example {index} of the {self.name} {split} split'
    label = int(record['label'])
    if not 0 <= label < self.num_classes:
      raise errors.Error(f'{where} has label {label}, outside 0..{self.num_classes - 1}.')
    labels = {'labels': np.full(1, label, np.int32), 'label_weights': np.ones(1, np.float32)}
    if self.pair:
      row = {}
      for suffix in ('1', '2'):
        tokens = fit(record[f'inputs{suffix}'], self.seq_len, self.truncate,
                     f'document {suffix} of {where}')
        row.update(pad(tokens, self.seq_len, suffix))
      return {**row, **labels}
    tokens = fit(record['inputs'], self.seq_len, self.truncate, where)
    if packed:
      return {'inputs': tokens, 'label': labels['labels']}
    return {**pad(tokens, self.seq_len), **labels}

  def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    records = self.records('train')
    local = local_batch_size(self.train_batch, process_count)
    ds = grain.MapDataset.range(len(records)).shuffle(seed=self.seed).repeat(None)
    ds = ds[process_index::process_count].map(
        lambda i: self.example(records[i], i, 'train', packed=self.pack))
    if not self.pack:
      return ds.batch(local, drop_remainder=True).to_iter_dataset()
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(), length_struct={'inputs': self.seq_len, 'label': self.max_segments},
        num_packing_bins=local, seed=self.seed, max_sequences_per_bin=self.max_segments)
    return packed.map(_packed_row).batch(local, drop_remainder=True)

  def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    records = self.records(self.eval_split)
    n = len(records) if not self.eval_steps else min(len(records),
                                                      self.eval_steps * self.eval_batch)
    total = math.ceil(n / self.eval_batch) * self.eval_batch
    row = lambda i: (self.example(records[i], i, self.eval_split) if i < n else
                     empty_row(self.seq_len, self.pair))
    ds = grain.MapDataset.range(total)[process_index::process_count].map(row)
    return ds.batch(local_batch_size(self.eval_batch, process_count)).to_iter_dataset()

  def target_weights(self, batch: dict) -> jax.Array:
    """[b, slots]: batch['label_weights'], 1 on the example slots that hold an example."""
    return batch['label_weights']

  def loss_and_metrics(self, outputs: jax.Array, batch: dict) -> tuple[jax.Array, Metrics]:
    """Cross-entropy and accuracy over the weighted slots of logits [b, S, C] (sums, counts).

    Unpacked rows (eval, and train without pack) fill slot 0 only: labels [b, 1] read the first
    slot of a model built for S > 1.
    """
    weights = self.target_weights(batch)
    slots = weights.shape[1]
    if outputs.shape[1] < slots:
      raise errors.Error(f'the model gives {outputs.shape[1]} example slots per row; the batch '
                         f'has {slots} (task.max_segments).')
    loss, metrics = token_metrics(outputs[:, :slots], batch['labels'], weights)
    del metrics['seq_accuracy']  # per row; a row is not a unit here
    return loss, metrics


def _packed_row(row: Record) -> Record:
  """FirstFitPackIterDataset's fields as a batch row: inputs, segment_ids, positions [T], labels
  and label_weights [S]."""
  return {'inputs': row['inputs'], 'segment_ids': row['inputs_segment_ids'],
          'positions': row['inputs_positions'], 'labels': row['label'],
          'label_weights': (row['label_segment_ids'] > 0).astype(np.float32)}
