"""Sweep: python -m efflong.sweep --config=configs/<task>.py:<arg> [--workdir=DIR] [--parallel=N].

Trains every point of the config's `get_sweep(arg)` (a list of {dotted key: value} overrides) with
`python -m efflong.main`. A point's key `arg` is appended to the config's argument instead (e.g.
{'arg': 'attention=local'}: what a dotted key cannot do, such as choosing another attention family,
whose hyper-parameters the config file sets). Each point trains in its own directory under the
sweep root; then sweep.csv, sweep.md and sweep.png are written there. Extra --config.<key>=<value>
flags apply to every point, before the point's own overrides. Finished points (done.json) are
skipped and unfinished ones resume from their checkpoint, so running the same command again
completes a sweep.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
from matplotlib.figure import Figure

from efflong import config as config_lib
from efflong import main as train_main  # defines --config and --workdir, parse_flags checks them

_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Points to train at once.', lower_bound=1)
# metrics.jsonl keys plotted against step; a config module's CURVES tuple replaces them.
_CURVES = ('eval/accuracy', 'train/loss')


def _safe(text: str, keep: str = '') -> str:
  """text with every character but letters, digits, `._+-` and those in `keep` replaced by `_`."""
  return re.sub(rf'[^\w.+\-{re.escape(keep)}]', '_', text)


def default_root(config_path: str, arg: str) -> str:
  """runs/sweeps/<config stem>_<arg>, the arg's `,` and `=` made `_` and `-`."""
  stem = os.path.splitext(os.path.basename(config_path))[0]
  name = f'{stem}_{arg.replace(",", "_").replace("=", "-")}' if arg else stem
  return os.path.join('runs', 'sweeps', _safe(name))


def point_name(overrides: dict[str, Any]) -> str:
  """The point's directory name: `key=value` by sorted key, comma separated, filesystem safe."""
  return _safe(','.join(f'{k}={overrides[k]}' for k in sorted(overrides)), keep='=,')


def load_points(config_spec: str) -> dict[str, dict[str, Any]]:
  """{point name: overrides} from get_sweep(arg) of `config_spec` (path:arg), in its order.

  Exits with one line naming the problem: no such file, no get_sweep, no points, a repeated point.
  """
  config_path, _, arg = config_spec.partition(':')
  if not os.path.isfile(config_path):
    sys.exit(f'efflong sweep: no config file {config_path!r} (from --config={config_spec}).')
  module = config_lib.load_module(config_path)
  if not hasattr(module, 'get_sweep'):
    sys.exit(f'efflong sweep: {config_path} has no get_sweep(arg); a sweep needs one that returns '
             'a list of {dotted config key: value} dicts.')
  points = module.get_sweep(arg)
  if not points or not all(isinstance(p, dict) and p for p in points):
    sys.exit(f'efflong sweep: get_sweep({arg!r}) in {config_path} returned {points!r}; expected a '
             'non-empty list of non-empty {dotted config key: value} dicts.')
  named = {point_name(p): p for p in points}
  if len(named) < len(points):
    sys.exit(f'efflong sweep: get_sweep({arg!r}) in {config_path} repeats a point: '
             f'{[point_name(p) for p in points]}.')
  return named


def point_command(config_spec: str, shared: list[str], overrides: dict[str, Any]) -> list[str]:
  """The point's `python -m efflong.main` command, less --workdir; exits naming an unknown key."""
  if 'arg' in overrides:
    config_spec += (',' if ':' in config_spec else ':') + overrides['arg']
  args = [f'--config={config_spec}', *shared,
          *(f'--config.{k}={v}' for k, v in sorted(overrides.items()) if k != 'arg')]
  problem = train_main.unknown_key(args)
  if problem:
    sys.exit(f'efflong sweep: point {point_name(overrides)} of {config_spec}: {problem}')
  return [sys.executable, '-m', 'efflong.main', *args]


def _run(command: list[str], point_dir: str) -> int:
  """Runs command with --workdir=point_dir, appending its output to log.txt there; exit code."""
  command = [*command, f'--workdir={point_dir}']
  os.makedirs(point_dir, exist_ok=True)
  with open(os.path.join(point_dir, 'log.txt'), 'a', encoding='utf-8') as log:
    log.write(f'$ {shlex.join(command)}\n')
    log.flush()
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}  # the log keeps stdout and stderr in order
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                          check=False).returncode


def _last_line(path: str) -> str:
  """The last non-empty line of a log (progress bars split on carriage returns)."""
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = [s.strip() for s in re.split(r'[\r\n]', f.read()) if s.strip()]
  return lines[-1] if lines else '(empty log)'


def _done(point_dir: str) -> dict[str, Any] | None:
  """The point's done.json, or None while it is unfinished."""
  path = os.path.join(point_dir, 'done.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _fmt(value: Any) -> str:
  """Numbers to 4 significant digits (integers whole), anything else as str."""
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def _metric_order(key: str) -> tuple[int, str]:
  """step first, then eval/, then train/, then the rest (speeds), each alphabetically."""
  if key == 'step':
    return 0, key
  return (1 if key.startswith('eval/') else 2 if key.startswith('train/') else 3), key


def _curve(point_dir: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of key in metrics.jsonl; a step logged twice keeps its last value."""
  path = os.path.join(point_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return [], []
  values = {}
  with open(path, encoding='utf-8') as f:
    for row in map(json.loads, f):
      if key in row:
        values[row['step']] = row[key]
  steps = sorted(values)
  return steps, [values[s] for s in steps]


def write_plot(root: str, names: list[str], curves: tuple[str, ...] = _CURVES) -> bool:
  """Writes sweep.png: curves against step, one line per point; False if there is no curve."""
  fig = Figure(figsize=(12, 4.5), layout='constrained')
  axes = fig.subplots(1, len(curves))
  plotted = False
  for ax, key in zip(axes, curves):
    for name in names:
      steps, values = _curve(os.path.join(root, name), key)
      if steps:
        ax.plot(steps, values, marker='.', label=name)
        plotted = True
    ax.set(xlabel='step', ylabel=key, title=key)
    ax.grid(alpha=0.3)
  if not plotted:
    return False
  axes[0].legend(fontsize='small')
  fig.savefig(os.path.join(root, 'sweep.png'), dpi=120)
  return True


def write_tables(root: str, finished: dict[str, dict[str, Any]], command: str) -> str:
  """Writes sweep.csv and sweep.md: one row per finished point, given as {name: overrides}.

  Returns:
    The markdown table.
  """
  rows = [{**overrides, **_done(os.path.join(root, name))} for name, overrides in finished.items()]
  keys = sorted({k for overrides in finished.values() for k in overrides})
  metrics = sorted({k for row in rows for k in row} - set(keys), key=_metric_order)
  columns = keys + metrics
  with open(os.path.join(root, 'sweep.csv'), 'w', encoding='utf-8', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  table = '\n'.join([
      '| ' + ' | '.join(columns) + ' |',
      '|' + '---|' * len(columns),
      *('| ' + ' | '.join(_fmt(row.get(c, '')) for c in columns) + ' |' for row in rows),
  ])
  with open(os.path.join(root, 'sweep.md'), 'w', encoding='utf-8') as f:
    f.write(f'{table}\n\nCommand: `{command}`\n')
  return table


def run_points(root: str, commands: dict[str, list[str]], parallel: int) -> list[str]:
  """Runs each command in <root>/<name>, `parallel` at a time, printing a line as each ends.

  Returns:
    The names of the points that did not finish (no done.json).
  """
  failed = []
  started = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = {pool.submit(_run, command, os.path.join(root, name)): name
               for name, command in commands.items()}
    try:
      for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
        name = futures[future]
        done = _done(os.path.join(root, name))
        if done is None:
          failed.append(name)
          status = (f'FAILED (exit {future.result()}): '
                    f'{_last_line(os.path.join(root, name, "log.txt"))}')
        else:
          status = 'done, ' + ' '.join(f'{k}={_fmt(v)}' for k, v in sorted(done.items())
                                       if k.startswith('eval/'))
        print(f'  [{i}/{len(commands)}, {time.perf_counter() - started:.0f}s] {name}: {status}',
              flush=True)
    except KeyboardInterrupt:  # running points checkpoint on the same SIGINT; start no more
      pool.shutdown(cancel_futures=True)
      sys.exit('efflong sweep: interrupted; run the same command to resume.')
  return failed


def main(argv: list[str]) -> None:
  """Runs the points not yet done, reports each as it ends, then writes the tables and the plot."""
  if len(argv) > 1:
    sys.exit(f'efflong sweep: unexpected argument {argv[1]!r}; flags are --config, --workdir, '
             '--parallel and --config.<key>=<value>.')
  config_flag = flags.FLAGS['config']
  if config_flag.value is None:
    sys.exit('efflong sweep: --config=configs/<task>.py:<arg> is required.')
  config_spec = config_flag.config_filename
  points = load_points(config_spec)
  shared = [f'--config.{k}={v}' for k, v in config_flag.override_values.items()]
  commands = {name: point_command(config_spec, shared, p) for name, p in points.items()}
  config_path, _, arg = config_spec.partition(':')
  root = flags.FLAGS.workdir or default_root(config_path, arg)

  todo = {n: c for n, c in commands.items() if _done(os.path.join(root, n)) is None}
  print(f'Sweep of {len(points)} points in {root}: {len(points) - len(todo)} done, '
        f'{len(todo)} to run, {_PARALLEL.value} at a time.', flush=True)
  for name in points:
    if name not in todo:
      print(f'  skipped {name}: done.json at step {_done(os.path.join(root, name))["step"]}')
  failed = run_points(root, todo, _PARALLEL.value)

  finished = {name: p for name, p in points.items() if name not in failed}
  if finished:
    command = shlex.join(['python', '-m', 'efflong.sweep', *sys.argv[1:]])
    table = write_tables(root, finished, command)
    curves = getattr(config_lib.load_module(config_path), 'CURVES', _CURVES)
    plotted = write_plot(root, list(finished), curves)
    print(f'\n{table}\n\nWrote sweep.csv, sweep.md{", sweep.png" if plotted else ""} in '
          f'{os.path.abspath(root)}')
  if failed:
    sys.exit(f'efflong sweep: {len(failed)} of {len(points)} points failed: '
             f'{", ".join(failed)}; see {os.path.join(root, "<point>", "log.txt")}.')


if __name__ == '__main__':
  app.run(main, flags_parser=train_main.parse_flags)
