"""Image (CIFAR-10 grayscale): the binary reader, LRA's grayscale, and TFDS's order and split."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing

from efflong import errors
from efflong.tasks.lra import builder, image

_PER_FILE = 3


def _fixture() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{file name: (images uint8 [3, 32, 32, 3], labels [3])}."""
  rng = np.random.default_rng(0)
  return {name: (rng.integers(0, 256, (_PER_FILE, 32, 32, 3), dtype=np.uint8),
                 rng.integers(0, 10, _PER_FILE))
          for name in image.TRAIN_FILES + image.TEST_FILES}


def _write_bins(folder, fixture) -> None:
  folder.mkdir()
  for name, (images, labels) in fixture.items():
    planes = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    (folder / name).write_bytes(np.concatenate([labels[:, None].astype(np.uint8), planes],
                                               axis=1).tobytes())


def test_grayscale_as_tensorflow():
  rgb = np.array([[255, 255, 255], [255, 0, 0], [0, 0, 0], [100, 150, 200]], np.uint8)
  np.testing.assert_array_equal(image.grayscale(rgb), [255, 76, 0, 141])
  rgb = np.random.default_rng(1).integers(0, 256, (4096, 3)).astype(np.uint8)
  exact = np.floor(rgb @ [0.2989, 0.5870, 0.1140] / 255 * 255.5)  # float64
  assert np.abs(image.grayscale(rgb) - exact).max() <= 1
  assert np.mean(image.grayscale(rgb) == exact) > 0.99


def test_tfds_order():
  for split in ('train', 'test'):
    np.testing.assert_array_equal(image.tfds_order(500, split),
                                  sorted(range(500), key=hashing.Hasher(split).hash_key))


class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A stand-in for TFDS cifar10 (its keys, hence its shuffling), prepared from the fixture."""
  VERSION = tfds.core.Version('3.0.2')
  code_path = None  # no checksums lookup (see builder.py)
  fixture = {}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(image.TRAIN_FILES),
            'test': self._generate_examples(image.TEST_FILES)}

  def _generate_examples(self, names):
    index = 0
    for name in names:
      for img, label in zip(*self.fixture[name]):
        yield index, {'image': img, 'label': int(label)}
        index += 1


def _split_records(task, split) -> tuple[np.ndarray, np.ndarray]:
  source = builder.data_source(task, split)
  return (np.stack([source[i]['inputs'] for i in range(len(source))]),
          np.array([int(source[i]['label']) for i in range(len(source))]))


def test_binary_files_and_prepared_tfds_give_lra_splits(tmp_path):
  fixture = _fixture()
  _write_bins(tmp_path / 'cifar-10-batches-bin', fixture)
  raw = ml_collections.ConfigDict({'name': 'image', 'data_dir': str(tmp_path / 'a'),
                                   'source_dir': str(tmp_path / 'cifar-10-batches-bin')})
  Cifar10.fixture = fixture
  Cifar10(data_dir=str(tmp_path / 'b'), file_format='array_record').download_and_prepare()
  prepared = ml_collections.ConfigDict({'name': 'image', 'data_dir': str(tmp_path / 'b')})
  train_images = np.concatenate([fixture[n][0] for n in image.TRAIN_FILES])
  train_labels = np.concatenate([fixture[n][1] for n in image.TRAIN_FILES])
  order = image.tfds_order(15, 'train')
  for split, rows in (('train', order[:13]), ('validation', order[13:])):  # 15 * 9 // 10 = 13
    inputs, labels = _split_records(raw, split)
    assert inputs.shape == (len(rows), 1024) and inputs.dtype == np.int32
    np.testing.assert_array_equal(labels, train_labels[rows])
    np.testing.assert_array_equal(inputs, image.grayscale(train_images[rows]).reshape(-1, 1024))
    for got, want in zip(_split_records(prepared, split), (inputs, labels)):
      np.testing.assert_array_equal(got, want)
  inputs, labels = _split_records(raw, 'test')
  np.testing.assert_array_equal(labels, fixture['test_batch.bin'][1][image.tfds_order(3, 'test')])
  np.testing.assert_array_equal(_split_records(prepared, 'test')[0], inputs)
  # Row-major pixels: pixel (y, x) of the first test image is token 32 y + x.
  first = fixture['test_batch.bin'][0][image.tfds_order(3, 'test')[0]]
  assert inputs[0, 32 * 5 + 7] == image.grayscale(first[5, 7])


def test_bad_files(tmp_path):
  path = tmp_path / 'data_batch_1.bin'
  path.write_bytes(bytes(3073 + 5))
  with pytest.raises(errors.Error, match='data_batch_1.bin holds 3078 bytes'):
    image.read_bin(str(path))
  path.write_bytes(bytes(3073) + bytes([10]) + bytes(3072))
  with pytest.raises(errors.Error, match='data_batch_1.bin: record 1 has label 10'):
    image.read_bin(str(path))
  task = ml_collections.ConfigDict({'name': 'image', 'data_dir': str(tmp_path)})
  with pytest.raises(errors.Error, match='CIFAR-10 not found'):
    next(image.examples(task, 'train'))
  task.source_dir = str(tmp_path)
  with pytest.raises(errors.Error, match='lacks .*data_batch_2.bin'):
    next(image.examples(task, 'train'))
