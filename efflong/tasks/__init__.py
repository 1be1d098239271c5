"""Tasks by config name (`config.task.name`).

A task gives the trainer three things and one flag, nothing else:
  train_dataset(process_index, process_count) -> grain.IterDataset of this process's batches
      (dicts of numpy arrays); its iterator's state is checkpointed with the model.
  eval_dataset(process_index, process_count) -> grain.IterDataset, finite.
  loss_and_metrics(outputs, batch) -> (loss, {name: (sum, count)}): loss is the differentiated
      scalar; metrics are sums and counts, so they add up across micro-batches, devices and batches.
  target_weights(batch) -> [B, P] float: the weight of each output position the loss scores, the
      first P along the outputs' axis 1 (tokens of a language model, example slots of a
      classifier); 0 where none. Distillation (efflong.compress.distill) scores the same ones.
  contiguous_rows: bool, True when row b of each train batch continues row b of the previous one
      (the text streams of a language model), so a model may carry memory from batch to batch.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import grain
import jax
import jax.numpy as jnp
import ml_collections

from efflong import errors

Metrics = dict[str, tuple[jax.Array, jax.Array]]

_TASKS = {
    'bytes_lm': 'efflong.tasks.bytes_lm:BytesLM',
    'duplication': 'efflong.tasks.duplication:Duplication',
    # Long Range Arena: one task class over the five tasks' data (efflong/tasks/lra).
    **{name: 'efflong.tasks.lra:LRA'
       for name in ('listops', 'text', 'retrieval', 'image', 'pathfinder')},
}


class Task(Protocol):

  contiguous_rows: bool

  def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    ...

  def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    ...

  def loss_and_metrics(self, outputs: jax.Array,
                       batch: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    ...

  def target_weights(self, batch: dict[str, jax.Array]) -> jax.Array:
    ...


def build(config: ml_collections.ConfigDict) -> Task:
  """The task named by config.task.name, built from the whole config."""
  name = config.task.name
  if name not in _TASKS:
    raise errors.Error(f'unknown task.name {name!r}; valid: {sorted(_TASKS)}.')
  module, cls = _TASKS[name].split(':')
  return getattr(importlib.import_module(module), cls)(config)


def local_batch_size(global_batch: int, process_count: int) -> int:
  """This process's share of a global batch; it must divide evenly."""
  if global_batch % process_count:
    raise errors.Error(f'batch size {global_batch} does not divide over {process_count} processes.')
  return global_batch // process_count


def token_metrics(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array) -> tuple[jax.Array, Metrics]:
  """Next-token cross-entropy and accuracy on the weighted positions.

  Args:
    logits: [B, T, V].
    targets: [B, T] int.
    weights: [B, T] 0/1; only weighted positions count.
  Returns:
    (mean loss over weighted tokens, metrics: loss, accuracy per token, seq_accuracy per sequence
    with at least one weighted token: all its weighted tokens right).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  loss_sum = (nll * weights).sum()
  correct = (logits.argmax(-1) == targets).astype(jnp.float32) * weights
  has_tokens = weights.sum(-1) > 0
  seq_right = (correct.sum(-1) == weights.sum(-1)) & has_tokens
  metrics = {
      'loss': (loss_sum, count),
      'accuracy': (correct.sum(), count),
      'seq_accuracy': (seq_right.sum().astype(jnp.float32), has_tokens.sum().astype(jnp.float32)),
  }
  return loss_sum / jnp.maximum(count, 1.0), metrics
