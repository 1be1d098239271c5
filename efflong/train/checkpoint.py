"""Checkpoints: orbax CheckpointManager over the train state and the grain iterator's state, and
`restore_variables`, the partial restore of another run's parameters (train.init_from, a
distillation teacher, efflong.infer.generate.load_model)."""

from __future__ import annotations

import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from efflong import errors
from efflong import params as params_lib


class Checkpoints:
  """Saves {state, data} under <workdir>/checkpoints, keeps the newest `keep`, restores the
  latest."""

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator) -> None:
    """Saves (asynchronously; `wait` before exit). A step already saved is skipped."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)))

  def restore(self, step: int, abstract_state: Any, shardings: Any,
              data_iter: grain.DatasetIterator) -> tuple[Any, str]:
    """(the state restored into `shardings`, a note); the data iterator is restored in place.

    The state restores onto any mesh and number of processes (orbax reads each array into its
    target sharding). The data iterators were saved one per process; with another number of
    processes (each reading other shards of the data) they are not restored, the data starts
    afresh, and the note (else '') says so.
    """
    items = {'state': ocp.args.StandardRestore(sharded(abstract_state, shardings))}
    counts = sorted({int(re.fullmatch(r'process_\d+-of-(\d+)\.json', name).group(1))
                     for name in os.listdir(os.path.join(self.directory, str(step), 'data'))
                     if name.endswith('.json')})
    note = ''
    if jax.process_count() in counts:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    else:
      note = (f'; its data position was saved by {" or ".join(map(str, counts))} process(es), '
              f'this run has {jax.process_count()}: the data starts afresh')
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state, note

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _array_name(path: tuple) -> str:
  """'params/stack/layers/0/ff/wi/kernel' for a tree path; an nnx Variable's 'value' (an attribute
  in the model's tree, a dict key in a checkpoint's metadata) is left out."""
  keys = [str(k) for k in params_lib.path_keys(path)]
  return '/'.join(keys[:-1] if keys and keys[-1] == 'value' else keys)


def restore_variables(workdir: str, target: dict[str, Any], *, key: str) -> tuple[dict, int]:
  """(fields of the TrainState in workdir's latest checkpoint, restored into target; its step).

  An orbax partial restore: only the fields target names are read (not the optimizer state), each
  array directly into its sharding. The checkpoint's shapes are checked first (orbax would pad or
  cut an array to the target's shape).

  Args:
    workdir: a training run's directory.
    target: {field: a tree of jax.ShapeDtypeStruct with shardings}, e.g. {'params': ...,
      'model_state': ...}, as trainer.TrainState names them.
    key: the config key that named workdir, for the errors (e.g. 'train.init_from').
  Raises:
    errors.Error: no checkpoint in workdir; an array of target missing from it or of another shape.
  """
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  step = None
  if os.path.isdir(directory):
    step = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False)).latest_step()
  if step is None:
    raise errors.Error(f'{key}={workdir!r}: no checkpoint in {directory!r}; give the workdir of '
                       'a trained run.')
  path = os.path.join(directory, str(step), 'state')
  flat = lambda tree: {_array_name(p): leaf.shape
                       for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved = flat(ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree)
  for array, shape in flat(target).items():
    if array not in saved:
      raise errors.Error(f'{key}={workdir!r}: {array} of this model is not in its checkpoint '
                         f'(step {step}); the two models differ.')
    if saved[array] != shape:
      raise errors.Error(f'{key}={workdir!r}: {array} has shape {saved[array]} in its checkpoint '
                         f'(step {step}) and {shape} in this model.')
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return restored, step


def sharded(abstract: Any, shardings: Any) -> Any:
  """The tree of jax.ShapeDtypeStruct with the shapes of abstract and these shardings."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      shardings)
