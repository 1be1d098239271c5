"""Retrieval (AAN pairs): the reader of the released TSV files, through the builder."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from efflong import errors
from efflong.tasks.lra import builder, retrieval

_ROWS = {'train': ['1.0\tP01-1001\tP02-2002\tWe parse.\tParsing, again \u00e9.',
                   '0.0\tP03-3003\tP04-4004\tA\tB c'],
         'eval': ['0\tX1\tX2\tOne.\tTwo.'], 'test': ['1\tY1\tY2\tThree\tFour']}


def _write(folder) -> None:
  folder.mkdir(exist_ok=True)
  for name, rows in _ROWS.items():
    (folder / f'new_aan_pairs.{name}.tsv').write_text('\n'.join(rows) + '\n', encoding='utf-8')


def _decode(ids: np.ndarray) -> str:
  return bytes((ids - 1).astype(np.uint8)).decode('utf-8')


def test_released_files_through_the_builder(tmp_path):
  _write(tmp_path / 'tsv_data')
  task = ml_collections.ConfigDict({'name': 'retrieval', 'data_dir': str(tmp_path / 'data'),
                                    'source_dir': str(tmp_path / 'tsv_data')})
  train = builder.data_source(task, 'train')
  assert len(train) == 2
  assert set(train[0]) == {'inputs1', 'inputs2', 'label'}
  assert (_decode(train[0]['inputs1']), _decode(train[0]['inputs2']), int(train[0]['label'])) == (
      'We parse.', 'Parsing, again \u00e9.', 1)
  assert train[0]['inputs2'].size == len('Parsing, again \u00e9.'.encode())  # bytes, not chars
  assert train[1]['label'] == 0
  validation = builder.data_source(task, 'validation')
  assert (_decode(validation[0]['inputs1']), int(validation[0]['label'])) == ('One.', 0)
  assert _decode(builder.data_source(task, 'test')[0]['inputs2']) == 'Four'


@pytest.mark.parametrize('row, message', [
    ('1.0\tA\tB\ttext', ':2: 4 tab-separated columns'),
    ('2\tA\tB\tx\ty', ":2: label '2'"),
    ('yes\tA\tB\tx\ty', ":2: label 'yes'"),
    ('1\tA\tB\t\ty', ':2: an empty document'),
])
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
  path = tmp_path / 'new_aan_pairs.train.tsv'
  path.write_text(_ROWS['train'][0] + '\n' + row + '\n')
  with pytest.raises(errors.Error, match=f'new_aan_pairs.train.tsv{message}'):
    list(retrieval.read_tsv(str(path)))


def test_missing_files(tmp_path):
  task = ml_collections.ConfigDict({'name': 'retrieval'})
  with pytest.raises(errors.Error, match='task.source_dir is unset: put LRA'):
    next(retrieval.examples(task, 'train'))
  task.source_dir = str(tmp_path)
  with pytest.raises(errors.Error, match='lacks .*new_aan_pairs.train.tsv'):
    next(retrieval.examples(task, 'train'))
