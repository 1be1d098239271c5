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
     "unknown config argument 'sequence_len'; valid: ['attention', 'families', 'fill', 'layers', 'paper', 'seq_len', 'smoke', 'table2']"),
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
