"""Retrieval (LRA, Tay et al. 2020, section 3.4): do two ACL Anthology Network papers cite one
another (Radev et al. 2013)? Two documents read byte by byte, 2 classes.

LRA's released files new_aan_pairs.{train,eval,test}.tsv (lra_release/tsv_data/ in
lra_release.gz) hold one pair per line, no header, five tab-separated columns as LRA's input
pipeline names them: label (written as a float, 0 or 1), id1, id2, text1, text2; no quoting.
Splits: train, eval (our validation), test. Token ids are each document's UTF-8 bytes + 1
(VOCAB_SIZE 257, 0 is padding); records {'inputs1': int32 [L1], 'inputs2': int32 [L2], 'label'}
keep whole documents (truncation to task.seq_len per document is the task's job).

Task field: source_dir, the folder holding the three files.
"""

from __future__ import annotations

import os
from typing import Iterator

import ml_collections
import numpy as np

from efflong import errors
from efflong.tasks.lra import builder

VOCAB_SIZE = 257
NUM_CLASSES = 2
FEATURES = {'inputs1': ((None,), np.int32), 'inputs2': ((None,), np.int32),
            'label': ((), np.int32)}
_FILES = {'train': 'new_aan_pairs.train.tsv', 'validation': 'new_aan_pairs.eval.tsv',
          'test': 'new_aan_pairs.test.tsv'}
_COLUMNS = ('label', 'id1', 'id2', 'text1', 'text2')


def encode(text: str) -> np.ndarray:
  """int32 [number of UTF-8 bytes]: the bytes + 1."""
  return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + 1


def read_tsv(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, {'inputs1', 'inputs2', 'label'}) per row of a released AAN file. A row with
  other than 5 columns, a label other than 0 or 1 or an empty document is an Error naming the
  file and line."""
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      row = line.rstrip('\r\n').split('\t')
      where = f'{path}:{number}'
      if len(row) != len(_COLUMNS):
        raise errors.Error(f'{where}: {len(row)} tab-separated columns; a row is '
                           f'{"<tab>".join(_COLUMNS)}.')
      try:
        label = float(row[0])
      except ValueError:
        label = None
      if label not in (0.0, 1.0):
        raise errors.Error(f'{where}: label {row[0]!r}; valid: 0 or 1.')
      if not row[3] or not row[4]:
        raise errors.Error(f'{where}: an empty document (text1 or text2); a pair holds two texts.')
      yield number, {'inputs1': encode(row[3]), 'inputs2': encode(row[4]), 'label': int(label)}


def data_fields(task: ml_collections.ConfigDict) -> dict[str, int | str]:
  """No field changes the data (it is the released files')."""
  del task
  return {}


def examples(task: ml_collections.ConfigDict, split: str) -> Iterator[tuple[str, dict]]:
  """(line number, record) of split's released file in task.source_dir."""
  source_dir = task.get('source_dir', '')
  paths = {s: os.path.join(source_dir, f) for s, f in _FILES.items()}
  if not source_dir or (missing := [p for p in paths.values() if not os.path.isfile(p)]):
    where = f'task.source_dir={source_dir!r} lacks {", ".join(missing)}' if source_dir else (
        'task.source_dir is unset')
    raise errors.Error(f"{where}: put LRA's new_aan_pairs.{{train,eval,test}}.tsv (lra_release/"
                       'tsv_data/ in https://storage.googleapis.com/long-range-arena/'
                       'lra_release.gz) in a folder and set task.source_dir to it.')
  for number, record in read_tsv(paths[split]):
    yield f'{number}', record
