"""Text (LRA, Tay et al. 2020, section 3.3): IMDb movie reviews (Maas et al. 2011) read byte by
byte, 2 classes (0 negative, 1 positive).

Token ids are the review's bytes + 1 (VOCAB_SIZE 257, 0 is padding), as LRA's ByteTextEncoder
gives; a record holds the whole review (truncation to task.seq_len is the task's job). Splits as
LRA's input pipeline: train is IMDb's 25,000 training reviews, and both validation and test are
IMDb's 25,000 test reviews (IMDb has no validation set).

Sources, in this order:
  task.source_dir  the unpacked aclImdb folder of https://ai.stanford.edu/~amaas/data/sentiment/
                   (train/{pos,neg}/*.txt and test/{pos,neg}/*.txt), read by `read_aclimdb`;
  TFDS imdb_reviews/plain_text prepared (file_format array_record) in the data directory.
Both give the same reviews: the file's bytes with surrounding whitespace stripped, as TFDS does.
"""

from __future__ import annotations

import glob
import os
from typing import Iterator

import ml_collections
import numpy as np

from efflong import errors
from efflong.tasks.lra import builder

VOCAB_SIZE = 257
NUM_CLASSES = 2
LABELS = ('neg', 'pos')  # label 0, 1 (TFDS imdb_reviews' ClassLabel names)
_IMDB_SPLIT = {'train': 'train', 'validation': 'test', 'test': 'test'}  # LRA's choice
_FETCH = ('download aclImdb_v1.tar.gz from https://ai.stanford.edu/~amaas/data/sentiment/, '
          'unpack it and set task.source_dir to its aclImdb folder (train/{pos,neg}/*.txt, '
          'test/{pos,neg}/*.txt)')


def encode(text: bytes) -> np.ndarray:
  """int32 [len(text)]: the bytes + 1."""
  return np.frombuffer(text, np.uint8).astype(np.int32) + 1


def read_aclimdb(root: str, imdb_split: str) -> Iterator[tuple[str, bytes, int]]:
  """(relative path, stripped text, label) of every review in root/<imdb_split>/{neg,pos}/*.txt,
  neg first, each folder in sorted file order. A missing folder or an empty review is an Error."""
  for label, name in enumerate(LABELS):
    folder = os.path.join(root, imdb_split, name)
    if not os.path.isdir(folder):
      raise errors.Error(f'task.source_dir={root!r} lacks {imdb_split}/{name}/: {_FETCH}.')
    for path in sorted(glob.glob(os.path.join(folder, '*.txt'))):
      with open(path, 'rb') as f:
        text = f.read().strip()
      if not text:
        raise errors.Error(f'{path} is an empty review; every aclImdb review holds text.')
      yield os.path.relpath(path, root), text, label


def data_fields(task: ml_collections.ConfigDict) -> dict[str, int | str]:
  """No field changes the data (both sources give the same reviews)."""
  del task
  return {}


def examples(task: ml_collections.ConfigDict, split: str) -> Iterator[tuple[str, dict]]:
  """(key, {'inputs': int32 [L], 'label': int}) of split, from task.source_dir or TFDS."""
  imdb_split = _IMDB_SPLIT[split]
  if source_dir := task.get('source_dir', ''):
    for path, text, label in read_aclimdb(source_dir, imdb_split):
      yield path, {'inputs': encode(text), 'label': label}
    return
  prepared = builder.prepared_tfds(task, 'imdb_reviews/plain_text')
  if prepared is None:
    raise errors.Error(f'IMDb not found: no imdb_reviews/plain_text in {builder.data_dir(task)} '
                       f'and task.source_dir is unset; {_FETCH}.')
  reviews = prepared.as_data_source(split=imdb_split)
  for i in range(len(reviews)):
    review = reviews[i]
    yield f'{i}', {'inputs': encode(review['text']), 'label': int(review['label'])}
