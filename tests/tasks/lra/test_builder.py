"""The LRA builder: a generator module's records round-trip through array_record, once."""

from __future__ import annotations

import os
import pickle
import types

import grain
import ml_collections
import numpy as np
import pytest

from efflong import errors
from efflong.tasks.lra import builder


def _records(split: str, n: int) -> list[dict]:
  rng = np.random.default_rng(len(split) * 100 + n)
  return [{'inputs': rng.integers(1, 16, size=rng.integers(1, 9)).astype(np.int32),
           'label': int(rng.integers(10))} for _ in range(n)]


def _tiny_module(calls: list[str], dtype=np.int32) -> types.SimpleNamespace:
  """A task module whose split sizes are task fields; it logs every examples() call."""
  def examples(task, split):
    calls.append(split)
    n = {'train': task.num_train, 'validation': 2, 'test': 3}[split]
    for i, r in enumerate(_records(split, n)):
      yield f'{split}-{i}', {'inputs': r['inputs'].astype(dtype), 'label': r['label']}
  return types.SimpleNamespace(
      __doc__='A tiny generator.', examples=examples,
      data_fields=lambda task: {'num_train': task.num_train},
      FEATURES={'inputs': ((None,), dtype), 'label': ((), np.int32)})


def _task(tmp_path, num_train: int = 12) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'name': 'tiny', 'data_dir': str(tmp_path),
                                    'num_train': num_train})


def _assert_same(source, expected) -> None:
  assert len(source) == len(expected)
  for got, want in zip((source[i] for i in range(len(source))), expected):
    assert set(got) == {'inputs', 'label'}
    assert got['inputs'].dtype == np.int32 and got['label'].dtype == np.int32
    np.testing.assert_array_equal(got['inputs'], want['inputs'])
    assert got['label'] == want['label']


def test_round_trip_in_order_then_reused(tmp_path):
  calls = []
  module = _tiny_module(calls)
  for split, n in (('train', 12), ('validation', 2), ('test', 3)):  # keys 'train-10' < 'train-2'
    _assert_same(builder.source(module, _task(tmp_path), split), _records(split, n))
  assert sorted(calls) == ['test', 'train', 'validation']  # prepared once, then reused
  assert os.path.isdir(tmp_path / 'lra_tiny' / 'num_train-12' / '1.0.0')
  assert not [p for p in os.listdir(tmp_path / 'lra_tiny') if p.startswith('incomplete')]
  # A task that changes the data gets its own prepared copy beside the first.
  _assert_same(builder.source(module, _task(tmp_path, 5), 'train'), _records('train', 5))
  assert len(calls) == 6
  # grain reads the source by index, and the source pickles for its workers.
  source = builder.source(module, _task(tmp_path), 'test')
  dataset = grain.MapDataset.source(pickle.loads(pickle.dumps(source)))
  _assert_same([dataset[i] for i in range(len(dataset))], _records('test', 3))


def test_narrow_dtype_stored_read_as_int32(tmp_path):
  module = _tiny_module([], dtype=np.uint8)
  source = builder.source(module, _task(tmp_path), 'train')
  _assert_same(source, _records('train', 12))
  pickle.loads(pickle.dumps(source))


def test_interrupted_preparation_leaves_nothing_prepared(tmp_path):
  def examples(task, split):
    yield f'{split}-0', _records(split, 1)[0]
    raise KeyboardInterrupt
  broken = types.SimpleNamespace(examples=examples, data_fields=lambda task: {})
  with pytest.raises(KeyboardInterrupt):
    builder.source(broken, _task(tmp_path), 'train')
  assert os.listdir(tmp_path / 'lra_tiny' / 'default') == []  # the incomplete copy is gone
  calls = []
  module = _tiny_module(calls)
  module.data_fields = lambda task: {}
  _assert_same(builder.source(module, _task(tmp_path), 'train'), _records('train', 12))


def test_bad_input(tmp_path):
  module = _tiny_module([])
  with pytest.raises(errors.Error, match="split='valid'"):
    builder.source(module, _task(tmp_path), 'valid')
  with pytest.raises(errors.Error, match="task.name='nope'"):
    builder.data_source(ml_collections.ConfigDict({'name': 'nope'}), 'train')
  with pytest.raises(errors.Error, match='letters, digits'):
    builder.config_name({'source_dir': '/a/b'})


def test_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert builder.data_dir(ml_collections.ConfigDict({'data_dir': ''})) == str(tmp_path)
  assert builder.data_dir(ml_collections.ConfigDict({'data_dir': '/x'})) == '/x'
  monkeypatch.delenv('TFDS_DATA_DIR')
  default = os.path.expanduser('~/tensorflow_datasets')
  assert builder.data_dir(ml_collections.ConfigDict()) == default
