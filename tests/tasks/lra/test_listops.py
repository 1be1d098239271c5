"""ListOps: the generator against a stack evaluator and a recursive twin of LRA's sampler, and the
reader of the released TSV files."""

from __future__ import annotations

import random

import ml_collections
import numpy as np
import pytest

from efflong import errors
from efflong.tasks.lra import builder, listops

_NAMES = {**{1 + d: str(d) for d in range(10)}, 11: 'MIN', 12: 'MAX', 13: 'MED', 14: 'SM',
          15: 'X'}


def _apply(op: str, args: list[int]) -> int:
  ordered = sorted(args)
  return {'MIN': min(args), 'MAX': max(args), 'SM': sum(args) % 10,
          'MED': int(np.median(ordered))}[op]  # LRA: int(np.median(...))


def evaluate(tokens) -> tuple[int, int, list[int]]:
  """(value, depth, argument counts) of a token sequence, by a stack; asserts it is well formed."""
  stack, result, depth = [], None, 0
  counts = []
  for t in tokens:
    name = _NAMES[int(t)]
    assert result is None, 'tokens after the end of the expression'
    if name in listops.OPERATORS:
      stack.append((name, []))
      depth = max(depth, len(stack))
      continue
    if name == 'X':
      op, args = stack.pop()
      counts.append(len(args))
      value = _apply(op, args)
    else:
      value = int(name)
      depth = max(depth, len(stack) + 1)
    if stack:
      stack[-1][1].append(value)
    else:
      result = value
  assert result is not None and not stack, 'unbalanced expression'
  return result, depth, counts


def _task(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'name': 'listops', **fields})


_SMALL = dict(min_len=6, max_len=40, num_train=300, num_valid=20, num_test=20, max_depth=4,
              max_args=4, seed=3)


def test_generated_distribution_labels_and_determinism():
  splits = listops.generate_splits(**_SMALL)
  assert [len(splits[s]) for s in builder.SPLITS] == [300, 20, 20]
  every = [e for s in builder.SPLITS for e in splits[s]]
  assert len({t.tobytes() for t, _ in every}) == len(every)  # distinct, across splits too
  depths, all_counts = set(), set()
  for tokens, label in every:
    assert 6 < tokens.size < 40
    assert tokens.min() >= 1 and tokens.max() <= 15
    value, depth, counts = evaluate(tokens)
    assert value == label
    depths.add(depth)
    all_counts.update(counts)
  assert max(depths) == 4 and all_counts == {2, 3, 4}  # the limits are reached, never passed
  assert set(label for _, label in every) == set(range(10))
  again = listops.generate_splits.__wrapped__(**_SMALL)
  assert all(np.array_equal(a, b) and x == y
             for (a, x), (b, y) in zip(splits['train'], again['train']))
  other = listops.generate_splits.__wrapped__(**{**_SMALL, 'seed': 4})
  assert not np.array_equal(splits['train'][0][0], other['train'][0][0])


def _lra_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> list[str]:
  """LRA's generate_tree (a digit with probability 3/4 below max_depth), as a word list."""
  if depth < max_depth and rng.random() <= listops.OPERATOR_P:
    words = [rng.choice(listops.OPERATORS)]
    for _ in range(rng.randint(2, max_args)):
      words += _lra_tree(rng, depth + 1, max_depth, max_args)
    return words + ['X']
  return [str(rng.randrange(10))]


def test_same_distribution_as_a_recursive_twin_of_lra_sampler():
  # Kept trees of length in (6, 40), depth <= 6, 2..5 arguments (trees long enough that the
  # early stop at max_len matters): mean length, root operator shares and label shares agree
  # within sampling noise (5 standard errors; fixed seeds).
  rng = random.Random(0)
  twin = []
  while len(twin) < 3000:
    words = _lra_tree(rng, 1, 6, 5)
    if 6 < len(words) < 40:
      twin.append([listops.WORDS[w] for w in words])
  tokens, lengths, values = listops.generate(np.random.default_rng(0), 20000, min_len=6,
                                             max_len=40, max_depth=6, max_args=5)
  ours = np.split(tokens, np.cumsum(lengths)[:-1])[:3000]
  assert len(ours) == 3000
  len_twin, len_ours = np.array([len(t) for t in twin]), np.array([len(t) for t in ours])
  se = np.hypot(len_twin.std() / np.sqrt(3000), len_ours.std() / np.sqrt(3000))
  assert abs(len_twin.mean() - len_ours.mean()) < 5 * se
  for feature in (lambda t: t[0], lambda t: evaluate(t)[0]):
    p = np.bincount([feature(t) for t in twin], minlength=16) / 3000
    q = np.bincount([feature(t) for t in ours], minlength=16) / 3000
    assert np.all(np.abs(p - q) < 5 * np.sqrt((p + q) / 2 * (1 - (p + q) / 2) * 2 / 3000) + 1e-9)
  assert [evaluate(t)[0] for t in ours] == values[:3000].tolist()


def test_generator_fields_checked():
  with pytest.raises(errors.Error, match='task.min_len=500, task.max_len=400'):
    listops.generator_fields(_task(min_len=500, max_len=400))
  with pytest.raises(errors.Error, match='task.max_depth=1'):
    listops.generator_fields(_task(max_depth=1))
  with pytest.raises(errors.Error, match='task.num_valid=0'):
    listops.generator_fields(_task(num_valid=0))
  with pytest.raises(errors.Error, match='found only'):  # 4 operators x 100 digit pairs
    listops.generate_splits.__wrapped__(3, 5, 500, 1, 1, 4, 2, 0)


_ROWS = [('( ( ( [MAX 2 ) 9 ) ] )', 9),
         ('( ( ( ( ( [MED 3 ) ( ( ( [SM 4 ) 9 ) ] ) ) 1 ) 8 ) ] )', 3),
         ('( ( ( [MIN 7 ) 5 ) ] )', 5)]


def _write_tsv(path, rows, header='Source\tTarget') -> None:
  path.write_text('\n'.join([header] + [f'{s}\t{t}' for s, t in rows]) + '\n')


def test_released_files_read_through_the_builder(tmp_path):
  source = tmp_path / 'listops-1000'
  source.mkdir()
  for name, rows in (('train', _ROWS), ('val', _ROWS[:1]), ('test', _ROWS[1:])):
    _write_tsv(source / f'basic_{name}.tsv', rows)
  rows = list(listops.read_tsv(str(source / 'basic_train.tsv')))
  assert [n for n, _, _ in rows] == [2, 3, 4]
  np.testing.assert_array_equal(rows[1][1], [13, 4, 14, 5, 10, 15, 2, 9, 15])
  for _, tokens, label in rows:
    assert evaluate(tokens)[0] == label
  task = _task(source_dir=str(source), data_dir=str(tmp_path / 'data'))
  test = builder.data_source(task, 'test')
  assert [int(test[i]['label']) for i in range(len(test))] == [3, 5]
  np.testing.assert_array_equal(test[1]['inputs'], [11, 8, 6, 15])
  assert (tmp_path / 'data' / 'lra_listops' / 'source-released').is_dir()


def test_generated_data_through_the_builder(tmp_path):
  task = _task(**_SMALL, data_dir=str(tmp_path))
  train = builder.data_source(task, 'train')
  expected = listops.generate_splits(**_SMALL)['train']
  assert len(train) == 300
  np.testing.assert_array_equal(train[7]['inputs'], expected[7][0])
  assert train[7]['label'] == expected[7][1]


@pytest.mark.parametrize('header, row, message', [
    ('Source\tTarget', '( ( [MAX 2 ) 9 ) ]', ':2: 1 tab-separated fields'),
    ('Source\tTarget', '( ( [MAX 2 ) 9 ) ]\t10', ':2: source'),
    ('Source\tTarget', '( ( [MUL 2 ) 9 ) ]\t1', ":2: word 'MUL'"),
    ('Src\tTarget', '( ( [MAX 2 ) 9 ) ]\t9', ":1: header 'Src"),
])
def test_malformed_rows_name_file_and_line(tmp_path, header, row, message):
  path = tmp_path / 'basic_train.tsv'
  path.write_text(f'{header}\n{row}\n')
  with pytest.raises(errors.Error, match=f'basic_train.tsv{message}'):
    list(listops.read_tsv(str(path)))


def test_missing_released_files(tmp_path):
  with pytest.raises(errors.Error, match='lacks .*basic_train.tsv.*put LRA'):
    next(listops.examples(_task(source_dir=str(tmp_path)), 'train'))
