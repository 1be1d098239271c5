"""The duplication generator: format, determinism, process sharding, bad lengths."""

import ml_collections
import numpy as np
import pytest

from efflong.tasks.duplication import Duplication, make_example


def _config(seq_len=12, vocab_size=8, batch_size=4) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(seed=3, task=dict(seq_len=seq_len, vocab_size=vocab_size),
                                        train=dict(batch_size=batch_size),
                                        eval=dict(steps=2, batch_size=batch_size)))


def test_example_is_0w0w_scored_on_the_second_w():
  ex = make_example(seed=0, stream=0, index=5, seq_len=12, vocab_size=8)
  inputs, targets, weights = ex['inputs'], ex['targets'], ex['weights']
  w = inputs[1:6]
  assert inputs[0] == 0 and inputs[6] == 0 and np.all(inputs[7:] == w)
  assert np.all((w >= 1) & (w < 8))
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  # Positions 6..10 predict tokens 7..11: exactly the second w.
  np.testing.assert_array_equal(np.nonzero(weights)[0], np.arange(6, 11))
  np.testing.assert_array_equal(targets[weights > 0], w)


def test_fill_variant_blanks_the_second_w_and_scores_it_in_place():
  ex = make_example(seed=0, stream=0, index=5, seq_len=12, vocab_size=8, fill=True)
  plain = make_example(seed=0, stream=0, index=5, seq_len=12, vocab_size=8)['inputs']
  np.testing.assert_array_equal(ex['inputs'], np.concatenate([plain[:7], np.zeros(5)]))
  np.testing.assert_array_equal(ex['targets'], plain)
  np.testing.assert_array_equal(np.nonzero(ex['weights'])[0], np.arange(7, 12))
  # Each scored token sits L/2 = 6 positions earlier in the input.
  np.testing.assert_array_equal(ex['targets'][7:], ex['inputs'][1:6])


def test_examples_are_a_function_of_seed_and_index():
  a = make_example(0, 0, 7, 12, 8)['inputs']
  np.testing.assert_array_equal(a, make_example(0, 0, 7, 12, 8)['inputs'])
  assert not np.array_equal(a, make_example(0, 0, 8, 12, 8)['inputs'])
  assert not np.array_equal(a, make_example(1, 0, 7, 12, 8)['inputs'])
  assert not np.array_equal(a, make_example(0, 1, 7, 12, 8)['inputs'])  # eval != train


def test_processes_split_the_same_global_batches():
  task = Duplication(_config(batch_size=4))
  whole = [next(iter(task.train_dataset(0, 1)))['inputs']]
  parts = [next(iter(task.train_dataset(p, 2)))['inputs'] for p in range(2)]
  assert parts[0].shape == (2, 12)
  rows = lambda a: sorted(map(tuple, np.concatenate(a)))
  assert rows(whole) == rows(parts)


def test_iterator_state_resumes_the_stream():
  task = Duplication(_config())
  it = iter(task.train_dataset(0, 1))
  next(it)
  state = it.get_state()
  expected = next(it)['inputs']
  again = iter(task.train_dataset(0, 1))
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['inputs'], expected)


def test_eval_set_is_finite_and_fixed():
  task = Duplication(_config())
  batches = [b['inputs'] for b in task.eval_dataset(0, 1)]
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[1], list(task.eval_dataset(0, 1))[1]['inputs'])


@pytest.mark.parametrize('seq_len', [3, 2, 13])
def test_lengths_that_cannot_hold_0w0w_are_refused(seq_len):
  with pytest.raises(ValueError, match=f'task.seq_len={seq_len} cannot hold 0w0w'):
    Duplication(_config(seq_len=seq_len))
