"""Image (LRA, Tay et al. 2020, section 3.5): CIFAR-10 (Krizhevsky 2009) as a sequence of 1024
grayscale pixels, 10 classes.

Grayscale as LRA's pipeline (tf.image.rgb_to_grayscale, then a cast): in float32, each channel
scaled by 1/255, weighted 0.2989 R + 0.5870 G + 0.1140 B, scaled by 255.5 and truncated, a value
0..255 (VOCAB_SIZE 256); the 32 x 32 image is read row by row. Splits as LRA's: train is the first
90% (45,000) of TFDS cifar10's train split in TFDS's stored order, validation the other 10%,
test is TFDS's test split (10,000).

Sources, in this order:
  task.source_dir  the cifar-10-batches-bin folder of https://www.cs.toronto.edu/~kriz/cifar.html
                   (data_batch_1..5.bin, test_batch.bin: records of 1 label byte and 3072 bytes,
                   the R, G and B planes), read by `read_bin`; its images are put in TFDS's
                   stored order (`tfds_order`), so both sources give the same splits;
  TFDS cifar10 prepared (file_format array_record) in the data directory.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

import ml_collections
import numpy as np

from efflong import errors
from efflong.tasks.lra import builder

VOCAB_SIZE = 256
NUM_CLASSES = 10
SIDE = 32
FEATURES = {'inputs': ((SIDE * SIDE,), np.uint8), 'label': ((), np.int32)}  # read back as int32
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)  # tf.image.rgb_to_grayscale's
TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
TEST_FILES = ('test_batch.bin',)
_RECORD = 1 + 3 * SIDE * SIDE


def grayscale(rgb: np.ndarray) -> np.ndarray:
  """uint8 [..., 32, 32]: tf.image.rgb_to_grayscale of uint8 [..., 32, 32, 3], in float32."""
  scaled = rgb.astype(np.float32) * np.float32(1 / 255)
  gray = scaled @ GRAY_WEIGHTS
  return (gray * np.float32(255.5)).astype(np.uint8)


def read_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 32, 32, 3], labels int64 [n]) of one CIFAR-10 binary file; a size that
  is not a whole number of records, or a label above 9, is an Error naming the file."""
  data = np.fromfile(path, np.uint8)
  if data.size == 0 or data.size % _RECORD:
    raise errors.Error(f'{path} holds {data.size} bytes, not a whole number of {_RECORD}-byte '
                       'CIFAR-10 records (1 label byte, 3 x 32 x 32 pixels).')
  records = data.reshape(-1, _RECORD)
  labels = records[:, 0].astype(np.int64)
  if (bad := np.flatnonzero(labels >= NUM_CLASSES)).size:
    raise errors.Error(f'{path}: record {bad[0]} has label {labels[bad[0]]}; valid: 0..9.')
  return records[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


def tfds_order(num: int, tfds_split: str) -> np.ndarray:
  """int64 [num]: the order TFDS stores examples 0..num-1 of cifar10's split in (ascending md5
  of the split name followed by the example's index, TFDS's shuffling of the keys)."""
  salt = hashlib.md5(tfds_split.encode())
  def key(i: int) -> int:
    md5 = salt.copy()
    md5.update(str(i).encode())
    return int(md5.hexdigest(), 16)
  return np.array(sorted(range(num), key=key), np.int64)


def _raw_split(source_dir: str, tfds_split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of TFDS's cifar10 split from the binary files, in TFDS's order."""
  names = TRAIN_FILES if tfds_split == 'train' else TEST_FILES
  paths = [os.path.join(source_dir, n) for n in TRAIN_FILES + TEST_FILES]
  if missing := [p for p in paths if not os.path.isfile(p)]:
    raise errors.Error(f'task.source_dir={source_dir!r} lacks {", ".join(missing)}: unpack '
                       'cifar-10-binary.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) and '
                       'set task.source_dir to its cifar-10-batches-bin folder.')
  parts = [read_bin(os.path.join(source_dir, n)) for n in names]
  images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  order = tfds_order(labels.size, tfds_split)
  return images[order], labels[order]


def _split(task: ml_collections.ConfigDict, tfds_split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 32, 32, 3], labels [n]) of TFDS's cifar10 split, in TFDS's order."""
  if source_dir := task.get('source_dir', ''):
    return _raw_split(source_dir, tfds_split)
  prepared = builder.prepared_tfds(task, 'cifar10')
  if prepared is None:
    raise errors.Error(f'CIFAR-10 not found: no cifar10 in {builder.data_dir(task)} and '
                       'task.source_dir is unset; unpack cifar-10-binary.tar.gz '
                       '(https://www.cs.toronto.edu/~kriz/cifar.html) and set task.source_dir '
                       'to its cifar-10-batches-bin folder.')
  records = prepared.as_data_source(split=tfds_split)
  examples = [records[i] for i in range(len(records))]
  images = np.stack([e['image'] for e in examples])
  if images.shape[1:] != (SIDE, SIDE, 3):
    raise errors.Error(f'cifar10 in {builder.data_dir(task)} has images of shape '
                       f'{images.shape[1:]}; CIFAR-10 images are (32, 32, 3).')
  return images, np.array([int(e['label']) for e in examples], np.int64)


def data_fields(task: ml_collections.ConfigDict) -> dict[str, int | str]:
  """No field changes the data (both sources give the same images in the same order)."""
  del task
  return {}


def examples(task: ml_collections.ConfigDict, split: str) -> Iterator[tuple[str, dict]]:
  """(index, {'inputs': uint8 [1024] grayscale pixels row by row, 'label': int}) of split."""
  images, labels = _split(task, 'test' if split == 'test' else 'train')
  if split != 'test':
    cut = labels.size * 9 // 10  # LRA: train[:90%], validation train[90%:]
    keep = slice(None, cut) if split == 'train' else slice(cut, None)
    images, labels = images[keep], labels[keep]
  pixels = grayscale(images).reshape(-1, SIDE * SIDE)
  for i, (row, label) in enumerate(zip(pixels, labels.tolist())):
    yield f'{i}', {'inputs': row, 'label': label}
