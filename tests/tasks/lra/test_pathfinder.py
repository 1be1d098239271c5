"""Pathfinder: the generator's labels, connectivity and determinism; the reader of the released
layout on fixtures written here."""

from __future__ import annotations

import collections
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from efflong import errors
from efflong.tasks.lra import pathfinder


def _components(image: np.ndarray, link: int) -> np.ndarray:
  """int [R, R] component number of every nonzero pixel (0 elsewhere), pixels up to `link` apart
  (Chebyshev) joined: a plain breadth-first flood fill."""
  res = image.shape[0]
  labels = np.zeros(image.shape, np.int64)
  count = 0
  for start in zip(*np.nonzero(image)):
    if labels[start]:
      continue
    count += 1
    labels[start] = count
    queue = collections.deque([start])
    while queue:
      y, x = queue.popleft()
      for ny in range(max(y - link, 0), min(y + link + 1, res)):
        for nx in range(max(x - link, 0), min(x + link + 1, res)):
          if image[ny, nx] and not labels[ny, nx]:
            labels[ny, nx] = count
            queue.append((ny, nx))
  return labels


def _check_connectivity(batch: pathfinder.Examples, resolution: int) -> None:
  """Flood fill from the first marker reaches the second exactly when the label is 1, and the
  flood fill's components are exactly the generator's contours."""
  link = pathfinder.GEOMETRIES[resolution].link_radius
  for image, label, ids, markers in zip(*batch):
    assert set(np.unique(image)) == {0, 255}
    components = _components(image, link)
    (y0, x0), (y1, x1) = markers
    assert image[y0, x0] and image[y1, x1]
    assert (components[y0, x0] == components[y1, x1]) == (label == 1)
    # Each component holds one contour id and each contour one component.
    pairs = set(zip(components[image > 0].tolist(), ids[image > 0].tolist()))
    assert len(pairs) == len({c for c, _ in pairs}) == len({i for _, i in pairs}) == ids.max()
  # Distractors (ids 3..) in most images, though a crowded image may have room for none.
  assert np.mean(batch.ids.max((1, 2)) >= 3) > .7


def test_labels_balanced_and_positives_connected():
  batch = pathfinder.generate(32, 14, 0, 'train', range(48))
  assert batch.images.shape == (48, 32, 32) and batch.images.dtype == np.uint8
  np.testing.assert_array_equal(batch.labels, np.arange(48) % 2 == 0)
  _check_connectivity(batch, 32)
  _check_connectivity(pathfinder.generate(32, 6, 1, 'validation', range(8)), 32)


def test_path_x_resolution():
  batch = pathfinder.generate(128, 14, 0, 'test', range(2))
  assert batch.images.shape == (2, 128, 128)
  _check_connectivity(batch, 128)


def test_deterministic_per_index():
  batch = pathfinder.generate(32, 14, 3, 'train', range(10))
  again = pathfinder.generate(32, 14, 3, 'train', [7, 2])  # alone, in another batch
  np.testing.assert_array_equal(again.images, batch.images[[7, 2]])
  np.testing.assert_array_equal(again.markers, batch.markers[[7, 2]])
  assert all((batch.images[i] != batch.images[i + 2]).any() for i in range(8))
  other = pathfinder.generate(32, 14, 3, 'test', [7])
  assert (other.images[0] != batch.images[7]).any()


def test_examples_generated():
  task = ml_collections.ConfigDict({'name': 'pathfinder', 'num_train': 3, 'num_valid': 2,
                                    'num_test': 1, 'seed': 5})
  got = list(pathfinder.examples(task, 'train'))
  assert [k for k, _ in got] == ['train-0', 'train-1', 'train-2']
  want = pathfinder.generate(32, 14, 5, 'train', range(3))
  for (_, record), image, label in zip(got, want.images, want.labels):
    assert record['inputs'].shape == (1024,) and record['inputs'].dtype == np.uint8
    np.testing.assert_array_equal(record['inputs'], image.reshape(-1))
    assert record['label'] == label
  assert len(list(pathfinder.examples(task, 'validation'))) == 2
  assert pathfinder.data_fields(task) == {'resolution': 32, 'contour_length': 14, 'num_train': 3,
                                          'num_valid': 2, 'num_test': 1, 'seed': 5}


@pytest.mark.parametrize('field, value', [('resolution', 48), ('contour_length', 2)])
def test_bad_settings(field, value):
  task = ml_collections.ConfigDict({'name': 'pathfinder', field: value})
  with pytest.raises(errors.Error, match=f'{field}={value}'):
    list(pathfinder.examples(task, 'train'))


def _released(tmp_path, rows: dict[int, list[int]], size: int = 32) -> tuple[str, dict]:
  """A released layout: metadata/<k>.npy text files and imgs/<k>/sample_<i>.png (grayscale, the
  first of each folder as RGB with equal channels), rows {k: labels}; returns (source_dir,
  {relative path: pixels})."""
  root = tmp_path / 'pathfinder32' / 'curv_contour_length_14'
  (root / 'metadata').mkdir(parents=True)
  rng = np.random.default_rng(0)
  pixels = {}
  for k, labels in rows.items():
    (root / 'imgs' / str(k)).mkdir(parents=True)
    lines = []
    for i, label in enumerate(labels):
      image = rng.integers(0, 256, (size, size), dtype=np.uint8)
      path = f'imgs/{k}/sample_{i}.png'
      if i == 0:
        Image.fromarray(np.stack([image] * 3, -1), 'RGB').save(root / path)
      else:
        Image.fromarray(image, 'L').save(root / path)
      pixels[path] = image
      lines.append(f'imgs/{k} sample_{i}.png {i} {label} 1.0 14 4 2 0.5 1 1\n')
    (root / 'metadata' / f'{k}.npy').write_text(''.join(lines))
  return str(tmp_path), pixels


def test_reader_released_layout(tmp_path):
  source_dir, pixels = _released(tmp_path, {10: [1, 0, 1, 1], 2: [0, 1, 0, 0, 1, 1]})
  task = ml_collections.ConfigDict({'name': 'pathfinder', 'source_dir': source_dir})
  got = {split: list(pathfinder.examples(task, split)) for split in pathfinder.SPLITS}
  assert [len(v) for v in got.values()] == [8, 1, 1]  # 80% / 10% / 10% of 10 rows
  keys = [k for split in pathfinder.SPLITS for k, _ in got[split]]
  # Files in numeric order (2.npy before 10.npy), lines in order.
  assert keys == [f'imgs/2/sample_{i}.png' for i in range(6)] + [
      f'imgs/10/sample_{i}.png' for i in range(4)]
  labels = [int(r['label']) for split in pathfinder.SPLITS for _, r in got[split]]
  assert labels == [0, 1, 0, 0, 1, 1, 1, 0, 1, 1]
  for split in pathfinder.SPLITS:
    for key, record in got[split]:
      np.testing.assert_array_equal(record['inputs'], pixels[key].reshape(-1))
  assert pathfinder.data_fields(task) == {'source': 'released', 'resolution': 32,
                                          'contour_length': 14}


def test_reader_errors(tmp_path):
  task = ml_collections.ConfigDict({'name': 'pathfinder', 'source_dir': str(tmp_path)})
  with pytest.raises(errors.Error, match='no Pathfinder metadata at .*metadata/\\*.npy'):
    list(pathfinder.examples(task, 'train'))
  source_dir, _ = _released(tmp_path, {0: [1, 0, 1, 0, 1]}, size=30)
  with pytest.raises(errors.Error, match='sample_0.png: image is 30x30 pixels; expected 32x32'):
    list(pathfinder.examples(task, 'train'))
  metadata = os.path.join(source_dir, 'pathfinder32', 'curv_contour_length_14', 'metadata', '0.npy')
  with open(metadata, 'a') as f:
    f.write('imgs/0 sample_5.png 5 2 1.0 14 4 2 0.5 1 1\n')
  with pytest.raises(errors.Error, match="0.npy:6: label '2'"):
    list(pathfinder.examples(task, 'train'))
