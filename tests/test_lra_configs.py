"""configs/lra.py: every task's `paper` config trains 2 steps on the CPU (shrunk, fake data), the
families sweep and argument errors, and a ListOps smoke run through the trainer on generated data."""

import json
import os

import jax
import numpy as np
import pytest

from efflong import config as config_lib
from efflong import errors
from efflong.tasks.lra import builder
from efflong.train import sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRA = config_lib.load_module(os.path.join(ROOT, 'configs', 'lra.py'))


def fake_source(task, split):
  """Random records in the task's layout: ids in 1..vocab - 1, lengths up to seq_len."""
  rng = np.random.default_rng(len(split))
  tokens = lambda: rng.integers(1, task.vocab_size, rng.integers(1, task.seq_len + 1)).astype(
      np.int32)
  fields = ('inputs1', 'inputs2') if task.name == 'retrieval' else ('inputs',)
  return [{**{f: tokens() for f in fields}, 'label': np.int32(i % task.num_classes)}
          for i in range(8)]


@pytest.mark.slow  # ~100 s of CPU: `./launch.sh test -m slow`
def test_every_paper_config_trains_two_steps(monkeypatch):
  """The paper setup of each task (kind, pooling, schedule, dropout, positions, head), shrunk to a
  tiny width, length and batch: 2 finite train steps over the 8 test devices (evaluation: the
  smoke run below)."""
  monkeypatch.setattr(builder, 'data_source', fake_source)
  for name in LRA.TASKS:
    c = LRA.get_config(f'{name},paper')
    assert c.model.kind == ('dual_encoder' if name == 'retrieval' else 'classifier')
    c.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=16, classifier_mlp_dim=16)
    c.task.seq_len = 32
    c.train.batch_size = c.eval.batch_size = 8
    c.train.warmup_steps = 1
    run = trainer.setup(c, jax.devices())
    state = run.init()
    data = iter(run.task.train_dataset(0, 1))
    for _ in range(2):
      state, metrics, scalars = run.train_step(state, sharding.global_batch(next(data),
                                                                            run.batch_sharding))
      assert bool(scalars['finite']), name
    assert float(metrics['accuracy'][1]) == 8, name  # one slot per row, every row an example


def test_families_sweep_and_arguments():
  points = LRA.get_sweep('listops,families')
  assert [p['arg'] for p in points] == [f'attention={f}' for f in LRA.FAMILIES]
  for family in LRA.FAMILIES:  # every family's hyper-parameters are ones it takes
    c = LRA.get_config(f'pathfinder,attention={family}')
    assert c.model.attention == family and c.task.seq_len == 1024
  packed = LRA.get_config('listops,pack,attention=linformer')
  assert packed.task.max_segments == 16 and packed.model.attention_kw.segments == 16
  for arg, match in (('attention=dense', 'needs exactly one task'),
                     ('listops,text', 'needs exactly one task'),
                     ('listops,layers=3', "unknown config argument 'layers'")):
    with pytest.raises(errors.Error, match=match):
      LRA.get_config(arg)
  with pytest.raises(errors.Error, match="give 'families'"):
    LRA.get_sweep('listops')


@pytest.mark.slow
def test_listops_smoke_run(tmp_path):
  """Generated ListOps (tiny splits, prepared into tmp_path) through train_and_evaluate, the batch
  rows sharded over the 8 test devices."""
  c = LRA.get_config('listops,smoke')
  c.task.data_dir = str(tmp_path / 'data')
  final = trainer.train_and_evaluate(c, str(tmp_path / 'run'), jax.devices())
  assert final['step'] == c.train.steps
  assert 0.0 <= final['eval/accuracy'] <= 1.0 and np.isfinite(final['eval/loss'])
  with open(tmp_path / 'run' / 'done.json', encoding='utf-8') as f:
    assert json.load(f)['step'] == c.train.steps
