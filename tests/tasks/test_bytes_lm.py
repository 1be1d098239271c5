"""The bytes_lm task: splits, contiguous rows, process sharding, resume, wrap, corpora, errors."""

import math
import os
import zipfile

import ml_collections
import numpy as np
import pytest

from efflong.tasks import bytes_lm
from efflong.tasks.bytes_lm import BytesLM

_N = 4000  # bytes of the test corpus: train 3600, valid 200, test 200


@pytest.fixture
def corpus(tmp_path) -> tuple[str, np.ndarray]:
  data = np.random.default_rng(0).integers(0, 256, size=_N, dtype=np.uint8)
  path = tmp_path / 'corpus.bin'
  path.write_bytes(data.tobytes())
  return str(path), data


def _config(corpus, seq_len=8, batch_size=4, eval_steps=2, eval_batch=4, vocab_size=256,
            cache_dir='') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0, task=dict(seq_len=seq_len, vocab_size=vocab_size, corpus=corpus, cache_dir=cache_dir),
      train=dict(batch_size=batch_size), eval=dict(steps=eval_steps, batch_size=eval_batch)))


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_split_rule_is_90_5_5_by_position(corpus):
  assert bytes_lm.split_bounds(100_000_000) == {
      'train': (0, 90_000_000), 'valid': (90_000_000, 95_000_000),
      'test': (95_000_000, 100_000_000)}
  assert bytes_lm.split_bounds(1001) == {'train': (0, 900), 'valid': (900, 950),
                                         'test': (950, 1001)}
  path, data = corpus
  task = BytesLM(_config(path))
  np.testing.assert_array_equal(task.split('train'), data[:3600])
  np.testing.assert_array_equal(task.split('valid'), data[3600:3800])
  np.testing.assert_array_equal(task.split('test'), data[3800:])


def test_rows_are_contiguous_streams_across_batches(corpus):
  path, data = corpus
  batches = _take(BytesLM(_config(path)).train_dataset(0, 1), 3)
  part = 3600 // 4
  for s, b in enumerate(batches):
    assert b['inputs'].shape == b['targets'].shape == b['weights'].shape == (4, 8)
    assert b['inputs'].dtype == b['targets'].dtype == np.int32
    assert b['weights'].dtype == np.float32 and np.all(b['weights'] == 1)
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
    for row in range(4):
      np.testing.assert_array_equal(b['inputs'][row], data[row * part + 8 * s:][:8])
  for prev, nxt in zip(batches, batches[1:]):  # each row continues where the last batch ended
    np.testing.assert_array_equal(nxt['inputs'][:, 0], prev['targets'][:, -1])


def test_processes_hold_consecutive_blocks_of_the_global_rows(corpus):
  path, _ = corpus
  task = BytesLM(_config(path))
  whole = _take(task.train_dataset(0, 1), 2)
  parts = [_take(task.train_dataset(p, 2), 2) for p in range(2)]
  for s in range(2):
    for key in ('inputs', 'targets', 'reset'):
      np.testing.assert_array_equal(np.concatenate([parts[0][s][key], parts[1][s][key]]),
                                    whole[s][key])


def test_iterator_state_resumes_the_stream(corpus):
  path, _ = corpus
  task = BytesLM(_config(path))
  it = iter(task.train_dataset(0, 1))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  again = iter(task.train_dataset(0, 1))
  again.set_state(state)
  got = next(again)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_train_wraps_every_row_at_once_and_flags_the_reset(corpus):
  path, data = corpus
  # train 3600 bytes in 4 parts of 900: (900 - 1) // 100 = 8 segments of 100 bytes per pass.
  batches = _take(BytesLM(_config(path, seq_len=100)).train_dataset(0, 1), 18)
  resets = [bool(b['reset'][0]) for b in batches]
  assert all(b['reset'].shape == (4,) and b['reset'].dtype == bool for b in batches)
  assert all(np.all(b['reset'] == b['reset'][0]) for b in batches)
  assert resets == [s % 8 == 0 for s in range(18)]
  for s in (8, 16):
    np.testing.assert_array_equal(batches[s]['inputs'], batches[0]['inputs'])
  np.testing.assert_array_equal(batches[7]['targets'][1], data[900 + 701:900 + 801])


def test_eval_is_a_finite_contiguous_pass_of_the_valid_split(corpus):
  path, data = corpus
  batches = list(BytesLM(_config(path, eval_steps=2, eval_batch=2)).eval_dataset(0, 1))
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[0]['inputs'][1], data[3600 + 100:][:8])
  assert batches[0]['reset'].all() and not batches[1]['reset'].any()
  # eval.steps 0 or None: every full segment, (200 // 2 - 1) // 8 = 12.
  for steps in (0, None):
    task = BytesLM(_config(path, eval_steps=steps, eval_batch=2))
    assert len(list(task.eval_dataset(0, 1))) == 12
  with pytest.raises(ValueError, match=r'^eval.steps=13 exceeds the 12 full segments of the valid'):
    BytesLM(_config(path, eval_steps=13, eval_batch=2)).eval_dataset(0, 1)


def test_enwik8_zip_reads_its_single_member(corpus, tmp_path):
  path, data = corpus
  zipped = tmp_path / 'enwik8.zip'
  with zipfile.ZipFile(zipped, 'w', zipfile.ZIP_DEFLATED) as z:
    z.write(path, 'enwik8')
  task = BytesLM(_config(str(zipped)))
  np.testing.assert_array_equal(task.split('valid'), data[3600:3800])
  np.testing.assert_array_equal(next(iter(task.train_dataset(0, 1)))['inputs'][0], data[:8])


def test_stdlib_gathering_is_sorted_filtered_and_cached(tmp_path):
  root = tmp_path / 'lib'
  files = {'b.py': b'b' * 50, 'a/z.py': b'z' * 30, 'a/b.py': b'x' * 20, 'notes.txt': b'no',
           'site-packages/p.py': b'no', 'env/pyvenv.cfg': b'', 'env/lib/q.py': b'no',
           'venv/__init__.py': b'v' * 10}  # the stdlib's own venv package stays
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(text)
  assert bytes_lm.stdlib_files(str(root)) == ['a/b.py', 'a/z.py', 'b.py', 'venv/__init__.py']
  expected = b'x' * 20 + b'\n' + b'z' * 30 + b'\n' + b'b' * 50 + b'\n' + b'v' * 10 + b'\n'
  assert bytes_lm.gather_stdlib(str(root)) == expected
  cache = tmp_path / 'cache'
  splits = bytes_lm.stdlib_splits(str(cache), root=str(root))
  assert sorted(os.listdir(cache)) == ['test.bin', 'train.bin', 'valid.bin']  # no temp file left
  assert b''.join(splits[s].tobytes() for s in bytes_lm.SPLITS) == expected
  assert splits['train'].size == 114 * 90 // 100
  (root / 'b.py').write_bytes(b'changed')  # a complete cache is read, not rebuilt
  assert bytes_lm.stdlib_splits(str(cache), root=str(root))['train'].tobytes() == expected[:102]


def test_bits_per_byte_is_the_loss_in_bits(corpus):
  task = BytesLM(_config(corpus[0]))
  logits = np.random.default_rng(1).normal(size=(2, 5, 256)).astype(np.float32)
  targets = np.random.default_rng(2).integers(0, 256, size=(2, 5)).astype(np.int32)
  loss, metrics = task.loss_and_metrics(logits, {'targets': targets,
                                                 'weights': np.ones((2, 5), np.float32)})
  bits, count = metrics['bits_per_byte']
  assert count == 10
  np.testing.assert_allclose(bits / count, loss / math.log(2), rtol=1e-6)


@pytest.mark.parametrize('name, content, message', [
    ('missing.bin', None, r"^task.corpus='.*missing.bin' does not exist"),
    ('empty.bin', b'', r"^task.corpus='.*empty.bin' is empty"),
])
def test_bad_corpus_paths_are_one_line_errors(tmp_path, name, content, message):
  if content is not None:
    (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=message) as e:
    BytesLM(_config(str(tmp_path / name)))
  assert '\n' not in str(e.value)


def test_vocab_size_must_be_256(corpus):
  with pytest.raises(ValueError, match=r'^task.vocab_size=128 does not fit bytes: it must be 256'):
    BytesLM(_config(corpus[0], vocab_size=128))


def test_config_builds_and_sweeps_every_decoder_family():
  from efflong import config as config_lib  # pylint: disable=import-outside-toplevel
  module = config_lib.load_module(os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                                               'bytes_lm.py'))
  c = module.get_config('smoke,attention=local,seq_len=64')
  assert (c.task.name, c.task.vocab_size, c.task.seq_len, c.model.kind) == ('bytes_lm', 256, 64,
                                                                            'lm')
  assert c.model.attention_kw.window == 16
  assert [p['arg'] for p in module.get_sweep('')] == [f'attention={n}' for n in module.FAMILIES]


def test_a_split_too_short_for_the_batch_is_refused(corpus):
  with pytest.raises(ValueError, match=r'^the valid split of .* \(200 bytes\) is too short for 8 '
                                       r'rows of seq_len \+ 1 = 26 bytes'):
    BytesLM(_config(corpus[0], seq_len=25, eval_batch=8)).eval_dataset(0, 1)
