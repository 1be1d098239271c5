"""Text (IMDb bytes): the aclImdb reader and a prepared TFDS imdb_reviews give the same records."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from efflong import errors
from efflong.tasks.lra import builder, text

_REVIEWS = {('train', 'pos', '0_9.txt'): b'Great film.\n',
            ('train', 'pos', '1_7.txt'): b'  Fine \xc3\xa9 ', ('train', 'neg', '2_1.txt'): b'Dull.',
            ('test', 'pos', '0_10.txt'): b'Yes!', ('test', 'neg', '3_2.txt'): b'No.',
            ('test', 'neg', '4_3.txt'): b'Bad\tplot.'}


def _write_aclimdb(root) -> None:
  for (split, label, name), content in _REVIEWS.items():
    (root / split / label).mkdir(parents=True, exist_ok=True)
    (root / split / label / name).write_bytes(content)
  (root / 'train' / 'unsup').mkdir()  # present in the release, not read


def _expected(imdb_split: str) -> list[tuple[bytes, int]]:
  return [(content.strip(), text.LABELS.index(label))
          for (split, label, name), content in sorted(_REVIEWS.items(), key=lambda kv: kv[0][1:])
          if split == imdb_split]


def _records(source) -> list[tuple[bytes, int]]:
  out = []
  for i in range(len(source)):
    r = source[i]
    out.append((bytes((r['inputs'] - 1).astype(np.uint8)), int(r['label'])))
    assert r['inputs'].min() >= 1 and r['inputs'].max() < text.VOCAB_SIZE
  return out


def test_aclimdb_reader_through_the_builder(tmp_path):
  _write_aclimdb(tmp_path / 'aclImdb')
  task = ml_collections.ConfigDict({'name': 'text', 'data_dir': str(tmp_path / 'data'),
                                    'source_dir': str(tmp_path / 'aclImdb')})
  assert _records(builder.data_source(task, 'train')) == _expected('train')
  assert _expected('train')[0] == (b'Dull.', 0)
  for split in ('validation', 'test'):  # both IMDb's test set, as in LRA
    assert _records(builder.data_source(task, split)) == _expected('test')
  np.testing.assert_array_equal(text.encode(b'\x00A\xff'), [1, 66, 256])


class ImdbReviews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A stand-in for TFDS imdb_reviews/plain_text (its features), prepared from the fixture."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='plain_text')]
  code_path = None  # no checksums lookup (see builder.py)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'text': tfds.features.Text(), 'label': tfds.features.ClassLabel(names=['neg', 'pos'])}))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    for (s, label, name), content in _REVIEWS.items():
      if s == split:
        yield name + label, {'text': content.strip(), 'label': label}


def test_prepared_tfds_imdb_reviews(tmp_path):
  ImdbReviews(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  task = ml_collections.ConfigDict({'name': 'text', 'data_dir': str(tmp_path)})
  for split, imdb_split in (('train', 'train'), ('test', 'test')):
    assert sorted(_records(builder.data_source(task, split))) == sorted(_expected(imdb_split))


def test_missing_data(tmp_path):
  task = ml_collections.ConfigDict({'name': 'text', 'data_dir': str(tmp_path)})
  with pytest.raises(errors.Error, match='IMDb not found.*task.source_dir to its aclImdb'):
    next(text.examples(task, 'train'))
  (tmp_path / 'aclImdb' / 'train' / 'neg').mkdir(parents=True)
  task.source_dir = str(tmp_path / 'aclImdb')
  with pytest.raises(errors.Error, match='lacks train/pos/'):
    list(text.examples(task, 'train'))
  (tmp_path / 'aclImdb' / 'train' / 'pos').mkdir()
  (tmp_path / 'aclImdb' / 'train' / 'pos' / '0_8.txt').write_bytes(b' \n')
  with pytest.raises(errors.Error, match='0_8.txt is an empty review'):
    list(text.examples(task, 'train'))
