"""The sweep command: point naming, the result tables, and a real smoke sweep that resumes."""

import csv
import json
import os
import subprocess
import sys

import pytest

from efflong import sweep
from tests.train import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_point_name_is_sorted_and_filesystem_safe():
  assert sweep.point_name({'task.seq_len': 64, 'model.num_layers': 2}) == (
      'model.num_layers=2,task.seq_len=64')
  assert sweep.point_name({'model.attention': 'a/b c'}) == 'model.attention=a_b_c'


def test_point_arg_extends_the_config_argument():
  command = sweep.point_command('configs/duplication.py:smoke', [],
                                {'arg': 'attention=local', 'model.num_layers': 1})
  assert command[3:] == ['--config=configs/duplication.py:smoke,attention=local',
                         '--config.model.num_layers=1']
  command = sweep.point_command('configs/duplication.py', [], {'arg': 'attention=local'})
  assert command[3:] == ['--config=configs/duplication.py:attention=local']


def test_default_root():
  assert sweep.default_root('configs/duplication.py', 'attention=dense,smoke') == os.path.join(
      'runs', 'sweeps', 'duplication_attention-dense_smoke')
  assert sweep.default_root('configs/duplication.py', '') == os.path.join('runs', 'sweeps',
                                                                          'duplication')


def test_config_without_get_sweep_is_one_line(tmp_path):
  path = tmp_path / 'plain.py'
  path.write_text('def get_config(arg=""):\n  return None\n')
  with pytest.raises(SystemExit, match=f'{path} has no get_sweep'):
    sweep.load_points(f'{path}:')


def _fake_point(root, name, done, rows):
  os.makedirs(root / name)
  (root / name / 'done.json').write_text(json.dumps(done))
  (root / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def test_tables_and_plot(tmp_path):
  rows = [{'step': 2, 'train/loss': 3.0}, {'step': 2, 'eval/accuracy': 0.25},
          {'step': 2, 'train/loss': 2.5}, {'step': 4, 'train/loss': 2.0}]  # step 2 again: resumed
  _fake_point(tmp_path, 'a=1', {'step': 4, 'train/loss': 2.0, 'eval/accuracy': 0.123456}, rows)
  _fake_point(tmp_path, 'a=2', {'step': 4, 'train/loss': 1.0, 'eval/accuracy': 1.0}, rows)
  table = sweep.write_tables(tmp_path, {'a=1': {'a': 1}, 'a=2': {'a': 2}}, 'python -m x')

  with open(tmp_path / 'sweep.csv', encoding='utf-8') as f:
    got = list(csv.DictReader(f))
  assert list(got[0]) == ['a', 'step', 'eval/accuracy', 'train/loss']
  assert [(r['a'], r['eval/accuracy']) for r in got] == [('1', '0.123456'), ('2', '1.0')]
  assert '| 1 | 4 | 0.1235 | 2 |' in table
  assert (tmp_path / 'sweep.md').read_text() == f'{table}\n\nCommand: `python -m x`\n'
  curve = sweep._curve(tmp_path / 'a=1', 'train/loss')  # pylint: disable=protected-access
  assert curve == ([2, 4], [2.5, 2.0])
  assert sweep.write_plot(tmp_path, ['a=1', 'a=2'])
  assert (tmp_path / 'sweep.png').stat().st_size > 0
  os.makedirs(tmp_path / 'empty')
  assert not sweep.write_plot(tmp_path / 'empty', ['a=1'])


@pytest.mark.slow  # ~50 s: 4 trainings in subprocesses, twice (./launch.sh test -m slow)
def test_smoke_sweep_then_rerun_skips(tmp_path):
  """The 4 smoke points, 2 at a time; the same command again skips all 4."""
  command = [sys.executable, '-m', 'efflong.sweep', '--config=configs/duplication.py:smoke',
             f'--workdir={tmp_path}', '--parallel=2']
  env = {**os.environ, 'XLA_FLAGS': ''}  # one device per point: 8 fake ones make it 1.7x slower
  first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
  assert first.returncode == 0, first.stderr
  with open(tmp_path / 'sweep.csv', encoding='utf-8') as f:
    got = list(csv.DictReader(f))
  assert len(got) == 4
  assert {(r['task.seq_len'], r['model.num_layers']) for r in got} == {
      ('16', '1'), ('16', '2'), ('32', '1'), ('32', '2')}
  assert all(r['step'] == '6' and 'eval/accuracy' in r for r in got)
  assert (tmp_path / 'model.num_layers=1,task.seq_len=16' / 'log.txt').exists()
  assert (tmp_path / 'sweep.png').exists()

  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
  assert again.returncode == 0, again.stderr
  assert again.stdout.count('skipped ') == 4, again.stdout


def test_table2_config_and_sweep():
  """Reformer's Table 2: the four training rows, and the five evaluations of each checkpoint."""
  module = load_config_module('duplication')
  full = {'model.attention_kw.n_hashes': 1, 'model.attention_kw.attend_across_buckets': True,
          'model.attention_kw.causal_band': False}
  assert module.get_sweep('table2') == [{'model.attention_kw.bucket_size': 64, **full},
                                        *({'model.attention_kw.n_hashes': n} for n in (1, 2, 4))]
  c = module.get_config('table2')
  assert (c.model.attention, c.model.attention_kw.bucket_size) == ('lsh', 8)
  assert {name: (v.bucket_size, v.n_hashes, v.attend_across_buckets, v.causal_band)
          for name, v in c.eval.variants.items()} == {
      'full': (64, 1, True, False), **{f'lsh-{n}': (8, n, None, None) for n in (1, 2, 4, 8)}}
  assert (c.model.attention_kw.attend_across_buckets, c.model.attention_kw.causal_band) == (
      False, True)   # the lsh-n evaluations inherit (None) the trained paper settings
  paper = module.get_config('table2,paper')
  m = paper.model
  assert (paper.task.seq_len, paper.task.vocab_size, m.num_layers, m.d_model, m.d_ff, m.num_heads,
          paper.train.steps) == (1024, 128, 1, 256, 256, 4, 150_000)
  assert paper.eval.variants['full'].bucket_size == 1024
  assert module.get_sweep('table2,paper')[0] == {'model.attention_kw.bucket_size': 1024, **full}
