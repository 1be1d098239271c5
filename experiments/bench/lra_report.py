"""Long Range Arena results: our CPU runs beside LRA's Table 1, every cell with its command.

Reads finished runs (their config.json, done.json and metrics.jsonl) and writes
  <out>.md / <out>.json       every task x family: ours where run here (test accuracy at the last
                              step, no model selection), the paper's, the command of each cell; the
                              `paper` command for each cell not run here;
  <out>_listops.md            ListOps: every family's test accuracy beside the majority class of the
                              generated test split (measured here), with learning curves
                              (<out>_curves.png: eval/accuracy against step, ListOps and
                              Pathfinder).

Command (after the runs whose commands RUNS below lists):
  ./launch.sh bench lra_report [--out=experiments/results/lra]
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any

import matplotlib
import ml_collections
from absl import app, flags

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

import benchlib
from efflong import config as config_lib
from efflong.tasks.lra import builder

ROOT = pathlib.Path(__file__).resolve().parents[2]
LRA = config_lib.load_module(str(ROOT / 'configs' / 'lra.py'))
_OUT = flags.DEFINE_string('out', 'experiments/results/lra', 'Writes <out>.md, .json, ...')

_LISTOPS = ('./launch.sh sweep --config=configs/lra.py:listops,families --parallel 2 '
            '--workdir=runs/sweeps/lra_listops_families --config.train.steps=800 '
            '--config.task.eval_split=test')
_LISTOPS_POINT = ('python -m efflong.main --config=configs/lra.py:listops,families,'
                  'attention={family} --config.train.steps=800 --config.task.eval_split=test '
                  '--workdir=runs/sweeps/lra_listops_families/arg=attention={family}')
_PATHFINDER = ('python -m efflong.main --config=configs/lra.py:pathfinder,attention={family} '
               '--config.task.eval_split=test{extra} --workdir=runs/lra_pathfinder_{family}')
# (task, family) -> (workdir, command) of the runs made here.
RUNS = {
    **{('listops', f): (f'runs/sweeps/lra_listops_families/arg=attention={f}',
                        _LISTOPS_POINT.format(family=f)) for f in LRA.FAMILIES},
    ('pathfinder', 'local'): ('runs/lra_pathfinder_local', _PATHFINDER.format(family='local',
                                                                               extra='')),
    ('pathfinder', 'linear'): ('runs/lra_pathfinder_linear', _PATHFINDER.format(family='linear',
                                                                                 extra='')),
    ('pathfinder', 'dense'): ('runs/lra_pathfinder_dense', _PATHFINDER.format(
        family='dense', extra=' --config.train.steps=200')),
}
_DATA = {'text': 'aclImdb/ (or TFDS imdb_reviews as array_record)',
         'retrieval': 'new_aan_pairs.{train,eval,test}.tsv', 'image': 'cifar-10-batches-bin/',
         'listops': None, 'pathfinder': None}


def load(workdir: str) -> dict[str, Any] | None:
  """{config, final, curve} of a finished run, or None."""
  path = ROOT / workdir
  if not (path / 'done.json').is_file():
    return None
  config = json.loads((path / 'config.json').read_text())
  curve = [(m['step'], m['eval/accuracy']) for m in map(json.loads, (
      path / 'metrics.jsonl').read_text().splitlines()) if 'eval/accuracy' in m]
  return {'config': config, 'final': json.loads((path / 'done.json').read_text()), 'curve': curve}


def majority(config: dict[str, Any]) -> tuple[float, int]:
  """(share of the most frequent label, examples) in the run's evaluation split."""
  task = ml_collections.ConfigDict(config['task'])
  source = builder.data_source(task, task.eval_split)
  labels = [int(source[i]['label']) for i in range(len(source))]
  return collections.Counter(labels).most_common(1)[0][1] / len(labels), len(labels)


def paper_command(task: str, family: str) -> str:
  data = _DATA[task]
  source = f' --config.task.source_dir=<dir with {data}>' if data else ''
  return (f'python -m efflong.main --config=configs/lra.py:{task},paper,attention={family}'
          f'{source} --workdir=runs/lra/{task}_{family}')


def main(argv: list[str]) -> None:
  del argv
  runs = {cell: (load(w), w, cmd) for cell, (w, cmd) in RUNS.items()}
  done = {cell: r for cell, r in runs.items() if r[0] is not None}
  base = {}
  for task in ('listops', 'pathfinder'):
    first = next((r[0] for (t, _), r in done.items() if t == task), None)
    if first is not None:
      base[task] = majority(first['config'])
  rows = []
  for task_index, task in enumerate(LRA.TASKS):
    for family in LRA.FAMILIES:
      run = done.get((task, family))
      rows.append({
          'task': task, 'family': family, 'paper': LRA.TABLE1[family][task_index],
          'ours': None if run is None else 100 * run[0]['final']['eval/accuracy'],
          'steps': None if run is None else run[0]['final']['step'],
          'workdir': None if run is None else run[1],
          'command': RUNS[(task, family)][1] if run is not None else paper_command(task, family)})
  head = benchlib.header('cpu')
  lines = ['# Long Range Arena: ours (CPU-sized, this machine) beside LRA Table 1', '', *head, '',
           'Ours: test accuracy (%) at the last step of a CPU-sized run (configs/lra.py defaults: '
           '2 layers, d_model 128 (Pathfinder 32), generated data; ListOps the whole sweep: '
           f'`{_LISTOPS}`); no model selection. The paper: its Table 1, models of 4-6 layers '
           'trained far longer. A cell not run here shows the `paper` command (GPU/TPU; Text, '
           'Retrieval, Image need their released data).', '']
  for task, (share, n) in base.items():
    lines.append(f'- {task}: majority class of the generated test split: {100 * share:.1f}% '
                 f'({n} examples)')
  lines += ['', '| task | family | ours | paper | steps | command |',
            '|---|---|---:|---:|---:|---|']
  for r in rows:
    ours = '—' if r['ours'] is None else f"{r['ours']:.1f}"
    lines.append(f"| {r['task']} | {r['family']} | {ours} | {r['paper']:.2f} | "
                 f"{r['steps'] or ''} | `{r['command']}` |")
  benchlib.emit(_OUT.value, lines, rows)

  if 'listops' in base:
    share = 100 * base['listops'][0]
    listops = [r for r in rows if r['task'] == 'listops']
    data = done[('listops', 'dense')][0]['config']['task']
    text = ['# LRA ListOps on the CPU: every family', '', *head, f'- runs: `{_LISTOPS}`',
            f"- data: generated ListOps, {data['min_len']} < length < {data['max_len']} tokens; "
            f'majority class of the test split {share:.1f}%', '',
            '| family | test accuracy (%) | over majority (points) | LRA paper (%) |',
            '|---|---:|---:|---:|']
    for r in listops:
      if r['ours'] is not None:
        text.append(f"| {r['family']} | {r['ours']:.1f} | {r['ours'] - share:+.1f} | "
                    f"{r['paper']:.2f} |")
    flat = [r['family'] for r in listops if r['ours'] is not None and r['ours'] - share < 5]
    text += ['', 'Within 5 points of the majority class (not learning): '
             f"{', '.join(flat) or 'none'}.",
             f'Learning curves: {pathlib.Path(_OUT.value).name}_curves.png']
    benchlib.write(_OUT.value + '_listops', '\n'.join(text) + '\n', listops)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for ax, task in zip(axes, ('listops', 'pathfinder')):
    for (t, family), (run, _, _) in done.items():
      if t == task:
        ax.plot(*zip(*run['curve']), label=family, marker='.')
    if task in base:
      ax.axhline(base[task][0], color='k', linestyle=':', label='majority class')
    ax.set(title=f'{task}: test accuracy', xlabel='step')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(_OUT.value + '_curves.png', dpi=110)


if __name__ == '__main__':
  app.run(main)
