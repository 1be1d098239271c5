"""A lost process in a multi-process run: the others stop within train.distributed_timeout_s with
one line naming it, and the relaunched run resumes from the last checkpoint."""

import contextlib
import dataclasses
import os
import queue
import threading
import time

import jax
import pytest
from jax.experimental import multihost_utils

from efflong import errors, main
from tests.train.test_multiprocess import SMOKE, finish, launch


@dataclasses.dataclass(frozen=True)
class _Device:
  process_index: int


def _watch(monkeypatch, fail_at: int, stopped: threading.Event) -> tuple[list, list]:
  """Runs watch_processes against a stand-in for JAX's live_devices over 2 processes, in which
  process 1 fails at round fail_at; (the rounds run, each on_loss call's argument)."""
  rounds, losses = [], queue.Queue()

  @contextlib.contextmanager
  def live_devices(devices):
    del devices
    rounds.append(len(rounds) + 1)
    yield [_Device(0), _Device(1)]
    if len(rounds) == fail_at:
      raise multihost_utils.ProcessFailureError({_Device(1)})

  monkeypatch.setattr(multihost_utils, 'live_devices', live_devices)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(main, '_WATCH_EVERY_S', 0.01)
  main.watch_processes(stopped, losses.put).join(timeout=10)
  return rounds, list(losses.queue)


def test_the_watch_names_the_lost_process(monkeypatch):
  rounds, losses = _watch(monkeypatch, fail_at=3, stopped=threading.Event())
  assert rounds == [1, 2, 3] and losses == [[1]]
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  assert main.lost_line([1], 5, '/runs/x') == (
      'efflong: process 0 of 2: lost process 1 (no heartbeat for 5 s); stopping. Relaunch the same '
      'command to resume from the last checkpoint in /runs/x/checkpoints.')


def test_a_stopped_watch_reports_nothing(monkeypatch):
  stopped = threading.Event()
  stopped.set()
  assert _watch(monkeypatch, fail_at=1, stopped=stopped) == ([], [])


def test_the_timeout_is_checked():
  with pytest.raises(errors.Error, match=r'^train.distributed_timeout_s=0 must be an int >= 1 '):
    main.initialize_distributed(0)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_the_run_resumes(tmp_path):
  """Process 1 killed after the first checkpoint: process 0 exits within the timeout (5 s, plus
  the watch's round and its exit) naming it; both relaunched resume at the last checkpoint."""
  timeout = f'--config.train.distributed_timeout_s={5}'
  procs = launch(2, tmp_path, SMOKE, '--config.train.steps=100000', timeout)
  deadline = time.monotonic() + 300
  while not (tmp_path / 'checkpoints' / '3').is_dir():
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.1)
  procs[1].kill()
  killed = time.monotonic()
  out = procs[0].communicate(timeout=60)[0]
  elapsed = time.monotonic() - killed
  procs[1].communicate()
  assert procs[0].returncode == main.LOST_PROCESS_EXIT and elapsed < 5 + 10, (elapsed, out)
  lines = [line for line in out.splitlines() if line.startswith('efflong:')]
  assert lines == [f'efflong: process 0 of 2: lost process 1 (no heartbeat for 5 s); stopping. '
                   f'Relaunch the same command to resume from the last checkpoint in '
                   f'{tmp_path / "checkpoints"}.'], out

  last = max(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  outs = finish(launch(2, tmp_path, SMOKE, f'--config.train.steps={last + 3}', timeout))
  assert f'Resumed from the checkpoint at step {last} in' in outs[0]
  assert f'Finished step {last + 3}:' in outs[0]
