"""ListOps (Nangia & Bowman 2018; LRA, Tay et al. 2020, section 3.1): evaluate a nested list of
operations on digits, 10 classes.

An expression such as [MAX 2 9 [MIN 4 7 ] 0 ] (value 9) is a tree: an operator node holds 2 to
max_args arguments, each a digit or a nested operator node; MIN, MAX, MED (the median; of an even
count, the mean of the two middle values rounded down) and SM (sum mod 10). The label is the value.

Generated data follows LRA's script (lra_benchmarks/data/listops.py): below max_depth (the root has
depth 1) a node is an operator with probability 1/4, else a digit; at max_depth it is a digit;
operator, argument count (2..max_args) and digits are uniform. A tree is kept when its token count
L satisfies min_len < L < max_len and it is new; the first num_train kept trees form train, the next
num_valid validation, the next num_test test. LRA's script also draws root digits (L = 1) and
rejects them; here the root is always an operator, the same distribution of kept trees for any
min_len >= 1. The trees are drawn a batch at a time, level by level, with numpy (`generate`).

Tokens (LRA's pipeline: ']' renamed 'X', parentheses dropped, 15 words): digits 0..9 -> ids 1..10,
MIN 11, MAX 12, MED 13, SM 14, X (the closing bracket) 15; 0 is padding, VOCAB_SIZE 16.

Task fields (defaults: LRA's): min_len 500, max_len 2000 (exclusive bounds on L), num_train 96000,
num_valid 2000, num_test 2000, max_depth 10, max_args 10, seed 0. A CPU-sized variant changes
min_len / max_len / num_*. source_dir (default ''): a folder holding LRA's released
listops-1000/basic_{train,val,test}.tsv, read instead of generating (`read_tsv`).
"""

from __future__ import annotations

import functools
import os
from typing import Iterator

import ml_collections
import numpy as np

from efflong import errors
from efflong.tasks.lra import builder

VOCAB_SIZE = 16
NUM_CLASSES = 10
OPERATORS = ('MIN', 'MAX', 'MED', 'SM')
DIGIT_ID = 1  # id of digit d: DIGIT_ID + d
OPERATOR_ID = 11  # id of OPERATORS[k]: OPERATOR_ID + k
CLOSE_ID = 15
WORDS = {**{str(d): DIGIT_ID + d for d in range(10)},
         **{name: OPERATOR_ID + k for k, name in enumerate(OPERATORS)}, 'X': CLOSE_ID}
GENERATOR_FIELDS = dict(min_len=500, max_len=2000, num_train=96000, num_valid=2000,
                        num_test=2000, max_depth=10, max_args=10, seed=0)
OPERATOR_P = 0.25  # LRA's VALUE_P: a node below max_depth is an operator with this probability
BATCH_TREES = 8192  # trees drawn per batch; fixed, so the data depend on the seed only
_STALL_BATCHES = 20  # batches in a row without a new tree: the length range holds too few trees
_TSV_FILES = {'train': 'basic_train.tsv', 'validation': 'basic_val.tsv', 'test': 'basic_test.tsv'}


def _reduce_children(values: np.ndarray, parent: np.ndarray, ops: np.ndarray) -> np.ndarray:
  """Each operator's value over its arguments' digit values, from a histogram of them.

  Args:
    values: int64 [M], the arguments' values (digits 0..9).
    parent: int64 [M], the index of each argument's operator in ops.
    ops: int64 [P], each operator's index into OPERATORS.
  Returns:
    int64 [P].
  """
  counts = np.bincount(parent * 10 + values, minlength=ops.size * 10).reshape(ops.size, 10)
  below = np.cumsum(counts, axis=1)  # [P, 10]: how many arguments are <= each digit
  n = below[:, -1:]
  kth = lambda k: np.argmax(below > k, axis=1)  # the k-th smallest (from 0) argument
  median = (kth((n - 1) // 2) + kth(n // 2)) // 2
  return np.choose(ops, [kth(np.zeros_like(n)), kth(n - 1), median, counts @ np.arange(10) % 10])


def generate(rng: np.random.Generator, num_trees: int, *, min_len: int, max_len: int,
             max_depth: int, max_args: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws num_trees operator-rooted trees level by level; returns those with min_len < L < max_len.

  Level d holds the nodes of depth d of all trees, each parent's arguments contiguous and in
  order. A tree that has reached max_len tokens stops growing (its nodes become digits) and is
  dropped at the end: it would have been rejected, so the kept trees are as LRA draws them, and
  the heavy tail of huge trees costs nothing. Sizes and values go up the levels; token positions
  (pre-order: an operator, its arguments, its X) come down.

  Returns:
    tokens: int8 [sum L], the kept trees' token ids one after another; lengths: int64 [K], L per
    kept tree; values: int64 [K], each kept tree's value (its label).
  """
  levels = []  # per depth: is_op, args (0 for digits), kind (operator or digit), parent, first
  count, parent, tree = num_trees, np.zeros(num_trees, np.int64), np.arange(num_trees)
  reached = np.zeros(num_trees, np.int64)  # tokens of each tree so far (a lower bound on L)
  for depth in range(1, max_depth + 1):
    reached += np.bincount(tree, minlength=num_trees)
    is_op = rng.random(count) < OPERATOR_P if depth > 1 else np.ones(count, bool)
    is_op &= (depth < max_depth) & (reached[tree] < max_len)
    reached += np.bincount(tree[is_op], minlength=num_trees)  # their X tokens
    args = np.where(is_op, rng.integers(2, max_args + 1, count), 0)
    kind = np.where(is_op, rng.integers(0, len(OPERATORS), count), rng.integers(0, 10, count))
    levels.append(dict(is_op=is_op, args=args, kind=kind, parent=parent,
                       first=np.cumsum(args) - args))  # first: where its arguments begin below
    parent = np.repeat(np.arange(count), args)
    tree, count = tree[parent], parent.size
  # Up: an operator's size is 2 plus its arguments' sizes; its value reduces theirs.
  below = None
  for level in levels[::-1]:
    is_op = level['is_op']
    level['size'] = np.ones(is_op.size, np.int64)
    level['value'] = level['kind'].astype(np.int64)
    if is_op.any():
      level['size'][is_op] = 2 + np.add.reduceat(below['size'], level['first'][is_op])
      operator = np.cumsum(is_op)[below['parent']] - 1  # of each argument, among the operators
      level['value'][is_op] = _reduce_children(below['value'], operator, level['kind'][is_op])
    below = level
  lengths, values = levels[0]['size'], levels[0]['value']
  # Down: positions in the flat token array; an argument follows its parent and elder siblings.
  tokens = np.zeros(lengths.sum(), np.int8)
  position = np.cumsum(lengths) - lengths
  for depth, level in enumerate(levels):
    if depth:
      before = np.cumsum(level['size']) - level['size']  # sizes of all earlier nodes of the level
      par = level['parent']
      position = position[par] + 1 + before - before[levels[depth - 1]['first'][par]]
    is_op = level['is_op']
    tokens[position] = np.where(is_op, OPERATOR_ID, DIGIT_ID) + level['kind']
    tokens[(position + level['size'] - 1)[is_op]] = CLOSE_ID
  keep = (min_len < lengths) & (lengths < max_len) & (reached < max_len)
  return tokens[np.repeat(keep, lengths)], lengths[keep], values[keep]


def generator_fields(task: ml_collections.ConfigDict) -> dict[str, int]:
  """The generator's task fields (GENERATOR_FIELDS' defaults where unset), checked."""
  f = {k: int(v) for k, v in builder.fields(task, GENERATOR_FIELDS).items()}
  if not 1 <= f['min_len'] < f['max_len'] - 1:
    raise errors.Error(f"task.min_len={f['min_len']}, task.max_len={f['max_len']}: kept lengths "
                       'L satisfy min_len < L < max_len; need 1 <= min_len < max_len - 1.')
  if f['max_depth'] < 2 or f['max_args'] < 2:
    raise errors.Error(f"task.max_depth={f['max_depth']}, task.max_args={f['max_args']}: each "
                       'must be >= 2 (an operator takes 2..max_args arguments below the root).')
  for k in ('num_train', 'num_valid', 'num_test'):
    if f[k] < 1:
      raise errors.Error(f'task.{k}={f[k]}: each split needs at least one example.')
  return f


@functools.lru_cache(maxsize=1)  # the builder asks for the three splits in turn
def generate_splits(min_len: int, max_len: int, num_train: int, num_valid: int, num_test: int,
                    max_depth: int, max_args: int, seed: int) -> dict[str, list[np.ndarray]]:
  """{split: [(tokens int8 [L], label)]}: the first num_train distinct kept trees of the seed's
  stream, then num_valid, then num_test."""
  rng = np.random.default_rng(seed)
  needed = num_train + num_valid + num_test
  seen, kept, stalled = set(), [], 0
  while len(kept) < needed:
    tokens, lengths, values = generate(rng, BATCH_TREES, min_len=min_len, max_len=max_len,
                                       max_depth=max_depth, max_args=max_args)
    before = len(kept)
    for example, value in zip(np.split(tokens, np.cumsum(lengths)[:-1]), values.tolist()):
      if len(kept) < needed and (key := example.tobytes()) not in seen:
        seen.add(key)
        kept.append((example, value))
    stalled = 0 if len(kept) > before else stalled + 1
    if stalled == _STALL_BATCHES:
      raise errors.Error(f'ListOps found only {len(kept)} distinct trees with {min_len} < length '
                         f'< {max_len} (max_depth {max_depth}, max_args {max_args}) of the '
                         f'{needed} asked for; widen the length range or ask for fewer.')
  bounds = np.cumsum([0, num_train, num_valid, num_test])
  return {split: kept[a:b] for split, a, b in zip(builder.SPLITS, bounds[:-1], bounds[1:])}


def tokenize(source: str) -> list[int]:
  """Token ids of an expression in LRA's released text form ('( ( [MAX 2 ) 9 ) ] )' or
  '[MAX 2 9 ]'): parentheses dropped, '[' before an operator dropped, ']' is X. Raises KeyError
  naming the first word that is not ListOps'."""
  words = source.replace('(', ' ').replace(')', ' ').replace('[', ' ').replace(']', ' X ').split()
  return [WORDS[w] for w in words]


def read_tsv(path: str) -> Iterator[tuple[int, np.ndarray, int]]:
  """(line number, tokens int32 [L], label) per row of a released ListOps file (header
  'Source\tTarget', then one expression and its value per line). A malformed row is an Error
  naming the file and line."""
  with open(path, encoding='utf-8') as f:
    header = f.readline().rstrip('\r\n')
    if header != 'Source\tTarget':
      raise errors.Error(f"{path}:1: header {header!r}; a ListOps file starts 'Source<tab>Target'.")
    for number, line in enumerate(f, start=2):
      row = line.rstrip('\r\n').split('\t')
      where = f'{path}:{number}'
      if len(row) != 2:
        raise errors.Error(f'{where}: {len(row)} tab-separated fields; a row is Source<tab>Target.')
      try:
        tokens = tokenize(row[0])
      except KeyError as e:
        raise errors.Error(f'{where}: word {e.args[0]!r} is not ListOps\'; valid: '
                           f'{" ".join(WORDS)}, [ ( ).') from None
      if not tokens or not row[1].strip().isdigit() or int(row[1]) >= NUM_CLASSES:
        raise errors.Error(f'{where}: source {row[0][:40]!r} / target {row[1]!r}; a row is a '
                           f'non-empty expression and a label 0..{NUM_CLASSES - 1}.')
      yield number, np.asarray(tokens, np.int32), int(row[1])


def _source_dir(task: ml_collections.ConfigDict) -> str:
  return task.get('source_dir', '')


def data_fields(task: ml_collections.ConfigDict) -> dict[str, int | str]:
  """{'source': 'released'} when reading task.source_dir, else the generator's fields."""
  return {'source': 'released'} if _source_dir(task) else generator_fields(task)


def examples(task: ml_collections.ConfigDict, split: str) -> Iterator[tuple[str, dict]]:
  """(key, {'inputs': int32 [L], 'label': int}) of split: read from task.source_dir's released
  files when it is set, else generated."""
  if source_dir := _source_dir(task):
    paths = {s: os.path.join(source_dir, f) for s, f in _TSV_FILES.items()}
    if missing := [p for p in paths.values() if not os.path.isfile(p)]:
      raise errors.Error(f'task.source_dir={source_dir!r} lacks {", ".join(missing)}: put LRA\'s '
                         'released listops-1000/basic_{train,val,test}.tsv there, or set '
                         "source_dir='' to generate the data.")
    for number, tokens, label in read_tsv(paths[split]):
      yield f'{number}', {'inputs': tokens, 'label': label}
  else:
    for i, (tokens, label) in enumerate(generate_splits(**generator_fields(task))[split]):
      yield f'{i}', {'inputs': tokens.astype(np.int32), 'label': label}
