"""Two processes joined by jax.distributed train the same run as one process; a checkpoint moves
between meshes and numbers of processes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from efflong.train import trainer
from tests.train import ROOT, smoke_config

SMOKE = '--config=configs/duplication.py:smoke'


def launch(n: int, workdir, *flags: str) -> list[subprocess.Popen]:
  """n processes of `python -m efflong.main --distributed` (as `./launch.sh multi n` starts them)
  on a free local port, one CPU device each, their output (stdout and stderr) in a pipe."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
         'EFFLONG_NUM_PROCESSES': str(n)}
  cmd = [sys.executable, '-m', 'efflong.main', '--distributed', f'--workdir={workdir}', *flags]
  return [subprocess.Popen(cmd, cwd=ROOT, env={**env, 'EFFLONG_PROCESS_ID': str(i)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
  """Each process's output once all have ended with status 0."""
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  return outs


def eval_loss(workdir) -> float:
  with open(os.path.join(workdir, 'done.json'), encoding='utf-8') as f:
    return json.load(f)['eval/loss']


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  outs = finish(launch(2, tmp_path / 'two', SMOKE))
  assert sum('Finished step 6' in out for out in outs) == 1  # only process 0 reports

  config = smoke_config(steps=6)
  with config.unlocked():
    config.mesh.data = 2
    config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 3
  one = trainer.train_and_evaluate(config, str(tmp_path / 'one'))
  assert abs(eval_loss(tmp_path / 'two') - one['eval/loss']) < 1e-5


def _fsdp4_model2_run(workdir) -> float:
  """3 steps on 8 devices, mesh fsdp 4 x model 2, checkpointed at the end; its eval loss."""
  config = smoke_config(steps=3)
  config.mesh.update(data=1, fsdp=4, model=2)
  return trainer.train_and_evaluate(config, str(workdir))['eval/loss']


def test_a_checkpoint_restores_on_one_device(tmp_path):
  """A run resumed at its last step evaluates what it restored: on 1 device, with the optimizer
  state restored into host memory (train.offload_optimizer), the eval loss of the 8-device run."""
  eight = _fsdp4_model2_run(tmp_path)
  config = smoke_config(steps=3, offload_optimizer=True)
  config.mesh.update(data=1, fsdp=1, model=1)
  one = trainer.train_and_evaluate(config, str(tmp_path))
  assert one['step'] == 3 and abs(one['eval/loss'] - eight) < 1e-5


@pytest.mark.slow
def test_a_checkpoint_restores_in_two_processes(tmp_path):
  """The 8-device checkpoint resumed by 2 processes (1 device each, mesh data 2): the same eval
  loss; their data position (saved by 1 process) starts afresh, and the resume says so."""
  eight = _fsdp4_model2_run(tmp_path / 'eight')
  shutil.copytree(tmp_path / 'eight', tmp_path / 'two')
  outs = finish(launch(2, tmp_path / 'two', SMOKE, '--config.train.steps=3'))
  assert 'Resumed from the checkpoint at step 3' in outs[0]
  assert 'saved by 1 process(es), this run has 2: the data starts afresh' in outs[0]
  assert abs(eval_loss(tmp_path / 'two') - eight) < 1e-5
