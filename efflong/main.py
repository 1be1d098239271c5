"""Entry point: python -m efflong.main --config=configs/<task>.py:<arg> --workdir=DIR [--config.x=y].

Multi-host: with --distributed (or under SLURM / with JAX_COORDINATOR_ADDRESS set) every process
calls jax.distributed.initialize() first; each then feeds its share of the batch.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
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
  if distributed:
    # launch.sh `multi` names the process; SLURM and other clusters are detected by JAX.
    n, i = os.environ.get('EFFLONG_NUM_PROCESSES'), os.environ.get('EFFLONG_PROCESS_ID')
    jax.distributed.initialize(num_processes=n and int(n), process_id=i and int(i))
  logging.set_verbosity(logging.WARNING)
  try:
    final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  except (trainer.NonFiniteLossError, errors.Error, errors.KeywordError) as e:
    # efflong's own config and input errors are one line; anything else (a bug, JAX's own errors)
    # keeps its traceback.
    if os.environ.get('EFFLONG_TRACEBACK'):
      raise
    sys.exit(f'efflong: {e} (EFFLONG_TRACEBACK=1 shows the traceback)')
  if jax.process_index() != 0:
    return
  shown = ', '.join(f'{k}={v:.4f}' for k, v in sorted(final.items()) if k.startswith('eval/'))
  print(f'Finished step {final.get("step")}: {shown}. Outputs in {os.path.abspath(_WORKDIR.value)}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
