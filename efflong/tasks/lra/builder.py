"""One TFDS builder per Long Range Arena task, prepared from the task module's own examples.

A task module (efflong.tasks.lra.<task.name>, or any object with the same attributes) gives
  examples(task, split) -> Iterator[(key, record)]   unique str keys; records are dicts of numpy
      arrays / ints in the layout of FEATURES; split in SPLITS.
  data_fields(task) -> dict[str, int | str]   the task fields that change the data, with their
      values (e.g. ListOps' length range, sizes and seed); they name the prepared data, so a
      CPU-sized ListOps and the paper's one live side by side.
  FEATURES (optional) {name: (shape, numpy dtype)}; default DEFAULT_FEATURES, variable-length
      token ids and a scalar label. A narrower dtype (uint8 pixels) only saves disk: records are
      read back as int32.
  VERSION (optional) 'x.y.z', default '1.0.0': bump it when the generator's output changes.

`data_source(task, split)` prepares the data on first use and returns the split as a random-access
sequence of records ({name: int32 array}), usable as grain.MapDataset.source(...). The data lives
in task.data_dir ('' or unset: $TFDS_DATA_DIR, else ~/tensorflow_datasets) under
lra_<task.name>/<config>/<version>/, array_record files written by tfds's GeneratorBasedBuilder
(no TensorFlow needed, neither to write nor to read: tfds 4.9's array_record writer and
tfds.data_source). Records keep the generator's order (shuffling is the task's job).

Preparation is safe against interruption and against several processes preparing at once: tfds
writes into an 'incomplete.*' directory renamed into place when complete, and a file lock beside
it lets one process prepare while the others wait and then reuse its data.
"""

from __future__ import annotations

import fcntl
import glob
import importlib
import os
import re
import types
from typing import Any, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from efflong import errors

SPLITS = ('train', 'validation', 'test')
DEFAULT_FEATURES = {'inputs': ((None,), np.int32), 'label': ((), np.int32)}
DEFAULT_VERSION = '1.0.0'
_CONFIG_NAME = re.compile(r'[\w+.-]+')


def fields(task: ml_collections.ConfigDict, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """{name: task.<name>, or defaults[name] where task lacks it} for every name in defaults."""
  return {k: task.get(k, v) for k, v in defaults.items()}


def data_dir(task: ml_collections.ConfigDict) -> str:
  """Where prepared data lives: task.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  path = task.get('data_dir', '') or os.environ.get('TFDS_DATA_DIR', '')
  return os.path.expanduser(path or os.path.join('~', 'tensorflow_datasets'))


def task_module(name: str) -> types.ModuleType:
  """The module efflong.tasks.lra.<name> (listops, text, retrieval, image, pathfinder)."""
  try:
    return importlib.import_module(f'efflong.tasks.lra.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'efflong.tasks.lra.{name}':
      raise
    raise errors.Error(f'task.name={name!r} is not an LRA task; valid: listops, text, retrieval, '
                       'image, pathfinder.') from None


def prepared_tfds(task: ml_collections.ConfigDict, name: str) -> tfds.core.DatasetBuilder | None:
  """The newest version of TFDS dataset `name` ('cifar10', 'imdb_reviews/plain_text') prepared
  in data_dir(task), or None. Prepared as tfrecord (TFDS's default) it is an Error: only
  array_record reads without TensorFlow."""
  infos = glob.glob(os.path.join(data_dir(task), name, '*', 'dataset_info.json'))
  if not infos:
    return None
  newest = max(infos, key=lambda p: tfds.core.Version(os.path.basename(os.path.dirname(p))))
  prepared = tfds.builder_from_directory(os.path.dirname(newest))
  if prepared.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise errors.Error(f'{os.path.dirname(newest)} holds {name} as '
                       f'{prepared.info.file_format.value}, which reads only with TensorFlow; '
                       f"prepare it with file_format='array_record' (tfds build {name} "
                       '--file_format=array_record), or give the raw files in task.source_dir.')
  return prepared


def config_name(data_fields: Mapping[str, int | str]) -> str:
  """'key-value_key-value...' of the fields that change the data ('default' without fields)."""
  name = '_'.join(f'{k}-{v}' for k, v in data_fields.items()) or 'default'
  if not _CONFIG_NAME.fullmatch(name):
    raise errors.Error(f'data fields {dict(data_fields)} give the name {name!r}; a prepared '
                       "dataset's name may hold only letters, digits and _ + . -")
  return name


def make_builder(module: Any, task: ml_collections.ConfigDict) -> tfds.core.GeneratorBasedBuilder:
  """The (not yet prepared) tfds builder lra_<task.name>/<config_name> of module's examples."""
  features = tfds.features.FeaturesDict({
      k: tfds.features.Tensor(shape=shape, dtype=dtype)
      for k, (shape, dtype) in getattr(module, 'FEATURES', DEFAULT_FEATURES).items()})
  description = (module.__doc__ or '').strip().split('\n')[0]

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes module.examples(task, split) for every split."""
    name = f'lra_{task.name}'
    VERSION = tfds.core.Version(getattr(module, 'VERSION', DEFAULT_VERSION))
    # No checksums file to look up beside the code: tfds's search for one would import
    # importlib_resources, which tfds does not install.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, Any]]]:
      del dl_manager  # the module reads its own sources
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, Any]]:
      return module.examples(task, split)

  config = tfds.core.BuilderConfig(name=config_name(module.data_fields(task)))
  return Builder(config=config, data_dir=data_dir(task), file_format='array_record')


def prepare(module: Any, task: ml_collections.ConfigDict) -> tfds.core.GeneratorBasedBuilder:
  """make_builder(module, task), prepared unless it already was (under a lock beside the data)."""
  builder = make_builder(module, task)
  if builder.is_prepared():
    return builder
  lock_dir = os.path.dirname(os.path.dirname(os.fspath(builder.data_path)))  # <data_dir>/lra_<name>
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, f'.{builder.builder_config.name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
    builder = make_builder(module, task)  # another process may have prepared it meanwhile
    if not builder.is_prepared():
      builder.download_and_prepare()
  return builder


class _Int32Records(Sequence[dict[str, np.ndarray]]):
  """A random-access source of records with int32 arrays (tfds gives scalars as Python ints and
  arrays in their stored dtype); picklable for grain's workers."""

  def __init__(self, source: Sequence[dict[str, np.ndarray]]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
    return {k: np.asarray(v, np.int32) for k, v in self._source[index].items()}


def source(module: Any, task: ml_collections.ConfigDict,
           split: str) -> Sequence[dict[str, np.ndarray]]:
  """The records of one split of module's data for task (prepared first if needed)."""
  if split not in SPLITS:
    raise errors.Error(f'split={split!r} is not an LRA split; valid: {", ".join(SPLITS)}.')
  # Read through a builder of the prepared directory: it pickles, the generating one does not.
  prepared = tfds.builder_from_directory(prepare(module, task).data_dir)
  return _Int32Records(prepared.as_data_source(split=split))


def data_source(task: ml_collections.ConfigDict, split: str) -> Sequence[dict[str, np.ndarray]]:
  """The records of one split of task.name's data, prepared in data_dir(task) on first use.

  Args:
    task: the task config: name (listops, text, retrieval, image, pathfinder), data_dir and the
      fields that task's module reads (see its docstring).
    split: 'train', 'validation' or 'test'.
  Returns:
    A sequence (len, random access by index) of records {'inputs': int32 [L], 'label': int32 []}
    (retrieval: 'inputs1' [L1], 'inputs2' [L2], 'label'), in the generator's order.
  """
  return source(task_module(task.name), task, split)
