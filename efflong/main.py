"""Entry point: python -m efflong.main --config=configs/<task>.py:<arg> --workdir=DIR [--config.x=y].

Multi-host: with --distributed (or under SLURM / with JAX_COORDINATOR_ADDRESS set) every process
calls jax.distributed.initialize() first; each then feeds its share of the batch. A process that
stops sending heartbeats for config.train.distributed_timeout_s is lost: each other process then
prints one line naming it and exits with LOST_PROCESS_EXIT (relaunching the same command resumes
from the last checkpoint). The coordinator (process 0) lost ends the others at once, by JAX's own
runtime (its message names the leader task).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from efflong import config as config_lib
from efflong import errors
from efflong.train import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/<task>.py:<arg>.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize() (default: when SLURM or '
    'JAX_COORDINATOR_ADDRESS says this is one of several processes).')


def _multi_process_env() -> bool:
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'JAX_COORDINATOR_ADDRESS' in os.environ


LOST_PROCESS_EXIT = 75  # EX_TEMPFAIL: a process of the run was lost; relaunching resumes
_WATCH_EVERY_S = 1.0


def initialize_distributed(timeout_s: int) -> None:
  """jax.distributed.initialize with heartbeat and shutdown timeouts of timeout_s, in JAX's
  recoverable mode: a lost process is reported to the others (watch_processes), not fatal to them;
  the run then ends with end_together (the mode has no shutdown barrier)."""
  if not isinstance(timeout_s, int) or timeout_s < 1:
    raise errors.Error(f'train.distributed_timeout_s={timeout_s!r} must be an int >= 1 (seconds).')
  # launch.sh `multi` names the process; SLURM and other clusters are detected by JAX.
  n, i = os.environ.get('EFFLONG_NUM_PROCESSES'), os.environ.get('EFFLONG_PROCESS_ID')
  jax.config.update('jax_enable_recoverability', True)
  jax.distributed.initialize(num_processes=n and int(n), process_id=i and int(i),
                             heartbeat_timeout_seconds=timeout_s,
                             shutdown_timeout_seconds=timeout_s)


def _live_processes() -> set[int]:
  """The processes with live devices, after a barrier of the live ones (JAX's live_devices, which
  leaves out a process without heartbeats for the timeout, or disconnected)."""
  live = set()
  try:
    with multihost_utils.live_devices(jax.devices()) as devices:  # those live at the last call
      live = {d.process_index for d in devices}
  except multihost_utils.ProcessFailureError as e:
    return live - {d.process_index for d in e.failed_devices}
  return live


def watch_processes(stopped: threading.Event,
                    on_loss: Callable[[list[int]], None]) -> threading.Thread:
  """A daemon thread: every _WATCH_EVERY_S until `stopped` is set, the processes meet
  (_live_processes); the first time one is missing, on_loss(the lost process indices) is called
  (a failed call to the coordinator: [0])."""

  def watch():
    while not stopped.wait(_WATCH_EVERY_S):
      try:
        lost = sorted(set(range(jax.process_count())) - _live_processes())
      except Exception:  # pylint: disable=broad-except (the coordinator does not answer)
        lost = [0]
      if lost and not stopped.is_set():
        on_loss(lost)
      if lost:
        return

  thread = threading.Thread(target=watch, name='efflong-watch-processes', daemon=True)
  thread.start()
  return thread


def end_together(stopped: threading.Event, watcher: threading.Thread) -> None:
  """Stops the watch and ends the processes in order: all meet, the others disconnect, and process
  0, which hosts the coordination service, returns (exits) only once they have."""
  stopped.set()
  multihost_utils.sync_global_devices('efflong: end')
  watcher.join()  # its last round ends as every process's watch stops or disconnects
  if jax.process_index() != 0:
    jax.distributed.shutdown()
    return
  while _live_processes() != {0}:  # another process's last watch round may still meet this one
    pass


def lost_line(lost: list[int], timeout_s: int, workdir: str) -> str:
  """The one line a process prints when others of the run are lost."""
  return (f'efflong: process {jax.process_index()} of {jax.process_count()}: lost process '
          f'{", ".join(map(str, lost))} (no heartbeat for {timeout_s} s); stopping. Relaunch the '
          'same command to resume from the last checkpoint in '
          f'{os.path.join(os.path.abspath(workdir), "checkpoints")}.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with config errors reduced to one line naming the key or value."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is not None and not os.path.isfile(spec.partition(':')[0]):
    sys.exit(f'efflong: bad flag or config: no config file {spec.partition(":")[0]!r}.')
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).splitlines()[0]
    if message.endswith(':'):  # "Error whilst parsing config file:": the cause says what
      root = e
      while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
      message = str(root).splitlines()[0]
    sys.exit(f'efflong: bad flag or config: {unknown_key(argv) or message}')


def unknown_key(argv: list[str]) -> str | None:
  """Names the first --config.<key> override that the config does not have, with the valid keys."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(':')
  try:
    config = config_lib.load_module(path).get_config(arg)
  except Exception:  # pylint: disable=broad-except
    return None  # the config itself fails to load: its own error is the one to show
  for a in argv:
    if not a.startswith('--config.'):
      continue
    keys, node = a[len('--config.'):].split('=', 1)[0].split('.'), config
    for i, key in enumerate(keys):
      if not hasattr(node, 'keys'):
        break
      if key not in node:
        parent = '.'.join(['config', *keys[:i]])
        return f'unknown key {parent}.{key}; valid keys of {parent}: {sorted(node.keys())}.'
      node = node[key]
  return None


def main(argv: list[str]) -> None:
  del argv
  if _WORKDIR.value is None:
    sys.exit('efflong: --workdir is required.')
  distributed = _multi_process_env() if _DISTRIBUTED.value is None else _DISTRIBUTED.value
  timeout_s = _CONFIG.value.train.distributed_timeout_s
  stopped, watcher = threading.Event(), None

  def on_loss(lost: list[int]) -> None:
    print(f'\n{lost_line(lost, timeout_s, _WORKDIR.value)}', file=sys.stderr, flush=True)
    os._exit(LOST_PROCESS_EXIT)  # pylint: disable=protected-access (no barrier to wait at)

  try:
    if distributed:
      initialize_distributed(timeout_s)
      if jax.process_count() > 1:
        watcher = watch_processes(stopped, on_loss)
    logging.set_verbosity(logging.WARNING)
    final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.Interrupted as e:
    print(e, file=sys.stderr)
    if watcher is not None:
      end_together(stopped, watcher)
    sys.exit(128 + e.signum)
  except (trainer.NonFiniteLossError, errors.Error, errors.KeywordError) as e:
    # efflong's own config and input errors are one line; anything else (a bug, JAX's own errors)
    # keeps its traceback.
    if os.environ.get('EFFLONG_TRACEBACK'):
      raise
    sys.exit(f'efflong: {e} (EFFLONG_TRACEBACK=1 shows the traceback)')
  except Exception:
    if watcher is not None:  # a collective failed as a process was lost: the watch names it
      watcher.join(timeout_s + 5 * _WATCH_EVERY_S)
    raise
  finally:
    stopped.set()
  if watcher is not None:
    end_together(stopped, watcher)
  if jax.process_index() != 0:
    return
  shown = ', '.join(f'{k}={v:.4f}' for k, v in sorted(final.items()) if k.startswith('eval/'))
  print(f'Finished step {final.get("step")}: {shown}. Outputs in {os.path.abspath(_WORKDIR.value)}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
