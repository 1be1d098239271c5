"""The command line: config errors are one clear line and a non-zero exit."""

import os
import subprocess
import sys

import pytest

from efflong import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/duplication.py:smoke', '--config.model.num_layer=3'],
     "unknown key config.model.num_layer; valid keys of config.model: ['activation',"),
    (['--config=configs/duplication.py:smoke', '--config.model.attention_kw.scal=0.5'],
     "unknown key config.model.attention_kw.scal; valid keys of config.model.attention_kw: "
     "['scale']"),
    (['--config=configs/duplication.py:smoke,seq_len=63'],
     'task.seq_len=63 cannot hold 0w0w: it must be even and >= 4.'),
    (['--config=configs/duplication.py:smoke,sequence_len=64'],
     "unknown config argument 'sequence_len'; valid: ['attention', 'distill', 'families', 'fill', 'layers', 'paper', 'seq_len', 'smoke', 'table2']"),
    (['--config=configs/duplication.py:attention=flash,smoke'],
     f"unknown attention 'flash'; known: {attention.names()}"),
    (['--config=configs/nope.py:smoke'], "no config file 'configs/nope.py'."),
    (['--config=configs/duplication.py:smoke', '--config.train.steps=many'],
     "--config.train.steps=many"),
])
def test_config_errors_are_one_line(tmp_path, args, expected):
  proc = subprocess.run([sys.executable, '-m', 'efflong.main', f'--workdir={tmp_path}', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('efflong: ') and expected in lines[0], lines[0]


# Runs efflong.main with the train step made to fail inside its jitted step, in one of two ways:
# 'jax' (a JAX shape error: not efflong's, so it keeps its traceback) or 'check' (an efflong input
# check that fails only when the jitted step runs: one line).
_FAILING_STEP = '''
import sys
import jax.numpy as jnp
from absl import app
from efflong import errors, main
from efflong.train import trainer

kind, make = sys.argv.pop(1), trainer.make_train_step

def failing(*args, **kwargs):
  step = make(*args, **kwargs)
  def train_step(state, batch):
    if kind == 'jax':
      jnp.reshape(jnp.ones(3), (2, 2))
    else:
      errors.check(lambda x: f'row {int(x)} is no good.', jnp.int32(3))
    return step(state, batch)
  return train_step

trainer.make_train_step = failing
app.run(main.main, flags_parser=main.parse_flags)
'''


def _run_failing_step(tmp_path, kind: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', _FAILING_STEP, kind, f'--workdir={tmp_path}',
                         '--config=configs/duplication.py:smoke,attention=dense'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_an_error_that_is_not_efflongs_keeps_its_traceback(tmp_path):
  proc = _run_failing_step(tmp_path, 'jax')
  assert proc.returncode != 0
  assert 'Traceback (most recent call last)' in proc.stderr, proc.stderr
  assert 'TypeError: cannot reshape array of shape (3,)' in proc.stderr, proc.stderr


def test_an_input_check_failing_inside_the_jitted_step_is_one_line(tmp_path):
  """Logged when the step runs, then raised by the trainer: one line, no traceback."""
  proc = _run_failing_step(tmp_path, 'check')
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr
  assert 'a check failed inside a jitted program: row 3 is no good.' in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'efflong: row 3 is no good. (EFFLONG_TRACEBACK=1 shows the traceback)'), proc.stderr
