"""Two processes joined by jax.distributed train the same run as one process."""

import json
import os
import socket
import subprocess
import sys

from efflong.train import trainer
from tests.train import ROOT, smoke_config


def test_two_processes_match_one(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
         'EFFLONG_NUM_PROCESSES': '2'}
  cmd = [sys.executable, '-m', 'efflong.main', '--distributed', f'--workdir={tmp_path / "two"}',
         '--config=configs/duplication.py:smoke']
  procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, 'EFFLONG_PROCESS_ID': str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert sum('Finished step 6' in out for out in outs) == 1  # only process 0 reports

  config = smoke_config(steps=6)
  with config.unlocked():
    config.mesh.data = 2
    config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 3
  one = trainer.train_and_evaluate(config, str(tmp_path / 'one'))
  with open(tmp_path / 'two' / 'done.json', encoding='utf-8') as f:
    two = json.load(f)
  assert abs(two['eval/loss'] - one['eval/loss']) < 1e-5
