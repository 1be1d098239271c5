"""The LRA task class over an in-memory source: rows, errors naming the example, eval coverage,
sharding, resumable iterators (packed too), and packed == unpacked loss through a classifier."""

import functools
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from efflong import config as config_lib
from efflong import errors, models
from efflong.tasks import lra

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
T, S = 16, 4
N_TRAIN, N_EVAL = 37, 11


def records(n: int, seed: int, max_len: int = T) -> list[dict]:
  """ListOps-like records: token ids 1..15, lengths 1..max_len, labels 0..9."""
  rng = np.random.default_rng(seed)
  return [{'inputs': rng.integers(1, 16, rng.integers(1, max_len + 1)).astype(np.int32),
           'label': np.int32(rng.integers(0, 10))} for _ in range(n)]


SOURCE = {'train': records(N_TRAIN, 0), 'validation': records(N_EVAL, 1), 'test': records(5, 2)}


def make_config(name: str = 'listops', **task) -> ml_collections.ConfigDict:
  c = config_lib.base(name)
  c.task.update(dict(seq_len=T, vocab_size=16, num_classes=10, truncate=False, pack=False,
                     max_segments=1, eval_split='validation'))
  c.task.update(task)
  c.model.kind = 'dual_encoder' if name == 'retrieval' else 'classifier'
  c.model.update(d_model=32, num_heads=2, d_ff=64, pooling='cls')
  c.train.batch_size, c.eval.batch_size, c.eval.steps = 4, 4, 0
  return c


def make_task(source=SOURCE, **task) -> lra.LRA:
  return lra.LRA(make_config(**task), source=lambda _, split: source[split])


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def test_unpacked_rows():
  task = make_task()
  batch = next(iter(task.train_dataset(0, 1)))
  assert {k: v.shape for k, v in batch.items()} == {
      'inputs': (4, T), 'segment_ids': (4, T), 'positions': (4, T), 'labels': (4, 1),
      'label_weights': (4, 1)}
  for row in range(4):
    n = int(batch['segment_ids'][row].sum())
    np.testing.assert_array_equal(batch['segment_ids'][row], np.arange(T) < n)
    np.testing.assert_array_equal(batch['positions'][row], np.where(np.arange(T) < n,
                                                                    np.arange(T), 0))
    assert (batch['inputs'][row, n:] == 0).all() and (batch['inputs'][row, :n] > 0).all()
    # The row is one of the train records, with its label.
    assert any(len(r['inputs']) == n and (r['inputs'] == batch['inputs'][row, :n]).all()
               and r['label'] == batch['labels'][row, 0] for r in SOURCE['train'])
  np.testing.assert_array_equal(batch['label_weights'], 1.0)


def test_errors_name_the_example():
  long = SOURCE['train'][:3] + [{'inputs': np.ones(T + 5, np.int32), 'label': np.int32(1)}]
  source = {**SOURCE, 'validation': long}
  with pytest.raises(errors.Error, match=r'example 3 of the listops validation split has 21 '
                                         r'tokens, more than task.seq_len=16; set task.truncate'):
    list(make_task(source).eval_dataset(0, 1))
  rows = list(make_task(source, truncate=True).eval_dataset(0, 1))
  np.testing.assert_array_equal(rows[0]['inputs'][3], np.ones(T))
  bad = {**SOURCE, 'validation': [{'inputs': np.ones(3, np.int32), 'label': np.int32(10)}]}
  with pytest.raises(errors.Error, match=r'example 0 of the listops validation split has label '
                                         r'10, outside 0..9'):
    list(make_task(bad).eval_dataset(0, 1))
  for task, match in ((dict(pack=True), 'needs task.max_segments >= 2'),
                      (dict(max_segments=3), 'applies to packed rows'),
                      (dict(vocab_size=17), r'task.vocab_size=17 does not match listops \(16\)'),
                      (dict(eval_split='valid'), "task.eval_split='valid'")):
    with pytest.raises(errors.Error, match=match):
      make_task(**task)
  with pytest.raises(errors.Error, match="needs model.kind='classifier'"):
    config = make_config()
    config.model.kind = 'lm'
    lra.LRA(config, source=lambda _, split: SOURCE[split])


def test_eval_covers_every_example_once_over_processes():
  """Two processes: every validation example in exactly one real row, the rest weight 0, the
  same number of batches on each process."""
  task = make_task()
  shards = [list(task.eval_dataset(p, 2)) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3  # ceil(11 / 4) global batches of 2 + 2 rows
  seen = []
  for shard in shards:
    for batch in shard:
      for row in range(len(batch['labels'])):
        if batch['label_weights'][row, 0]:
          n = int(batch['segment_ids'][row].sum())
          seen.append((tuple(batch['inputs'][row, :n]), int(batch['labels'][row, 0])))
        else:
          assert not batch['segment_ids'][row].any()
  want = [(tuple(r['inputs']), int(r['label'])) for r in SOURCE['validation']]
  assert sorted(seen) == sorted(want)
  # eval.steps bounds the examples; eval_split='test' reads the test split.
  config = make_config()
  config.eval.steps = 1
  assert len(list(lra.LRA(config, source=lambda _, s: SOURCE[s]).eval_dataset(0, 1))) == 1
  assert sum(b['label_weights'].sum() for b in make_task(eval_split='test').eval_dataset(0, 1)) == 5


def test_train_is_endless_shuffled_per_pass_and_split_over_processes():
  task = make_task()
  one = take(iter(task.train_dataset(0, 1)), 20)  # 80 rows: more than two passes of 37
  key = lambda b, r: (tuple(b['inputs'][r]), int(b['labels'][r, 0]))
  rows = [key(b, r) for b in one for r in range(4)]
  first, second = rows[:N_TRAIN], rows[N_TRAIN:2 * N_TRAIN]
  assert sorted(first) == sorted(second) and first != second  # each pass: all, in a new order
  two = [take(iter(task.train_dataset(p, 2)), 5) for p in range(2)]
  for step in range(5):
    both = [key(two[p][step], r) for p in range(2) for r in range(2)]
    assert sorted(both) == sorted(rows[4 * step:4 * step + 4])


@pytest.mark.parametrize('pack', [False, True])
def test_iterator_state_resumes_exactly(pack):
  task = make_task(pack=pack, max_segments=S if pack else 1)
  it = iter(task.train_dataset(0, 1))
  take(it, 3)
  state = it.get_state()
  after = take(it, 4)
  resumed = iter(task.train_dataset(0, 1))
  resumed.set_state(state)
  for a, b in zip(after, take(resumed, 4)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@functools.lru_cache(maxsize=None)
def classifier(pooling: str) -> nnx.Module:
  config = make_config(pack=True, max_segments=S)
  config.model.pooling = pooling
  return models.build(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('pooling', ['mean', pytest.param('cls', marks=pytest.mark.slow)])
def test_packed_and_unpacked_batches_give_the_same_loss(pooling):
  """A packed batch's examples, each in its own unpacked row: equal loss and accuracy sums and
  counts through the classifier and loss_and_metrics."""
  task = make_task(pack=True, max_segments=S)
  packed = next(iter(task.train_dataset(0, 1)))
  assert packed['labels'].shape == (4, S) and packed['segment_ids'].max() > 1
  rows = []
  for b in range(4):
    for s in range(S):
      if packed['label_weights'][b, s]:
        at = packed['segment_ids'][b] == s + 1
        np.testing.assert_array_equal(packed['positions'][b][at], np.arange(at.sum()))
        rows.append(task.example({'inputs': packed['inputs'][b][at],
                                  'label': packed['labels'][b, s]}, 0, 'train'))
  assert len(rows) > 4  # packing put more examples than rows
  unpacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  model = classifier(pooling)
  metrics = {}
  for name, batch in (('packed', packed), ('unpacked', unpacked)):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    metrics[name] = task.loss_and_metrics(model(batch), batch)[1]
  assert set(metrics['packed']) == {'loss', 'accuracy'}
  for k in ('loss', 'accuracy'):
    np.testing.assert_allclose(np.asarray(metrics['packed'][k]), np.asarray(metrics['unpacked'][k]),
                               rtol=1e-5, atol=1e-5)
  assert float(metrics['packed']['loss'][1]) == len(rows)


def test_retrieval_pairs():
  pytest.importorskip('efflong.tasks.lra.retrieval')
  rng = np.random.default_rng(0)
  pairs = [{'inputs1': rng.integers(1, 257, rng.integers(1, T + 1)).astype(np.int32),
            'inputs2': rng.integers(1, 257, rng.integers(1, T + 1)).astype(np.int32),
            'label': np.int32(i % 2)} for i in range(6)]
  config = make_config('retrieval', vocab_size=257, num_classes=2)
  task = lra.LRA(config, source=lambda _, split: pairs)
  batch = next(iter(task.eval_dataset(0, 1)))
  assert sorted(batch) == ['inputs1', 'inputs2', 'label_weights', 'labels', 'positions1',
                           'positions2', 'segment_ids1', 'segment_ids2']
  n = len(pairs[0]['inputs2'])
  np.testing.assert_array_equal(batch['inputs2'][0, :n], pairs[0]['inputs2'])
  np.testing.assert_array_equal(batch['segment_ids2'][0], np.arange(T) < n)
  out = models.build(config, rngs=nnx.Rngs(0))({k: jnp.asarray(v) for k, v in batch.items()})
  loss, metrics = task.loss_and_metrics(out, batch)
  assert out.shape == (4, 1, 2) and np.isfinite(float(loss)) and float(metrics['loss'][1]) == 4
  with pytest.raises(errors.Error, match="applies to"):
    lra.LRA(make_config('retrieval', vocab_size=257, num_classes=2, pack=True, max_segments=2),
            source=lambda _, split: pairs)
