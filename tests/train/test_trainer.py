"""The trainer: sharding equality, resume exactness, non-finite handling, accumulation, precision."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from efflong import config as config_lib
from efflong import tasks
from efflong.train import trainer
from tests.train import smoke_config


def byte_corpus(tmp_path, size: int) -> str:
  """A file of `size` pseudo-random text bytes; its path."""
  path = tmp_path / 'corpus.txt'
  path.write_bytes(np.random.default_rng(0).integers(32, 127, size, dtype=np.uint8).tobytes())
  return str(path)


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def test_one_device_equals_eight(tmp_path):
  """data=2 x context=2 x model=2 over 8 devices (the batch split, the length split: ring attention,
  the heads split) gives the losses of 1 device (dropout on, 8 steps)."""
  results = []
  for mesh in (dict(data=1, fsdp=1, model=1), dict(data=2, fsdp=1, context=2, model=2)):
    config = smoke_config(steps=8, dropout_rate=0.1)
    with config.unlocked():
      config.mesh.update(mesh)
    workdir = tmp_path / f'mesh{mesh["data"]}'
    trainer.train_and_evaluate(config, str(workdir))
    results.append(losses(workdir))
  assert len(jax.devices()) == 8
  assert results[0].keys() == set(range(1, 9))
  for other in results[1:]:
    np.testing.assert_allclose(list(other.values()), list(results[0].values()), rtol=2e-5)


class _SignalAt:
  """A task whose train data sends this process SIGTERM as it hands out the batch of `step`.

  The restarted run keeps the wrapper (its iterator state has the wrapper's shape); its restored
  counter is past `step`, so it does not signal again.
  """

  def __init__(self, task, step):
    self.task, self.step = task, step

  def __getattr__(self, name):
    return getattr(self.task, name)

  def train_dataset(self, process_index, process_count):
    ds = self.task.train_dataset(process_index, process_count)

    def maybe_signal(i, batch):
      if i + 1 == self.step:
        os.kill(os.getpid(), signal.SIGTERM)
      return batch

    return ds.map_with_index(maybe_signal)


@pytest.mark.parametrize('attention, attention_kw, arg', [
    # Transformer-XL on contiguous byte rows: the memory and the data position must both resume.
    pytest.param('xl', None, 'mem_len=8,seq_len=8', marks=pytest.mark.slow),
    # Redraws at steps 3, 6, 9 | 12, ...: the resumed run must restore the step-9 features.
    pytest.param('performer', {'redraw_every': 3, 'nb_features': 8}, '', marks=pytest.mark.slow),
    # One E shared by both layers: a module shared across layers must checkpoint and restore.
    ('linformer', {'share': 'layerwise', 'k': 4}, 'fill'),
])
def test_resume_is_bitwise_exact(tmp_path, monkeypatch, attention, attention_kw, arg):
  """20 steps straight == a run killed by SIGTERM at step 10 and restarted, bitwise on the CPU."""
  task = 'bytes_lm' if attention == 'xl' else 'duplication'
  config = smoke_config(steps=20, dropout_rate=0.1, attention=attention, attention_kw=attention_kw,
                        arg=arg, task=task)
  if task == 'bytes_lm':  # 8 rows of 180 training bytes: 22 segments of 8
    config.task.corpus = byte_corpus(tmp_path, 1600)
  trainer.train_and_evaluate(config, str(tmp_path / 'straight'))
  straight = losses(tmp_path / 'straight')

  build = tasks.build
  monkeypatch.setattr(tasks, 'build', lambda c: _SignalAt(build(c), step=10))
  with pytest.raises(trainer.Interrupted, match=r'Interrupted \(SIGTERM\) at step 10; checkpoint'):
    trainer.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert max(losses(tmp_path / 'resumed')) == 10 and not (tmp_path / 'resumed/done.json').exists()
  trainer.train_and_evaluate(config, str(tmp_path / 'resumed'))
  resumed = losses(tmp_path / 'resumed')
  assert resumed[20] == straight[20]  # bitwise
  assert resumed == straight


class _NanAt(_SignalAt):
  """A task whose loss is NaN at `step` (the batch carries the flag)."""

  def train_dataset(self, process_index, process_count):
    ds = self.task.train_dataset(process_index, process_count)
    flag = lambda i, batch: {**batch, 'nan': np.full(len(batch['inputs']), i + 1 == self.step)}
    return ds.map_with_index(flag)

  def loss_and_metrics(self, outputs, batch):
    loss, metrics = self.task.loss_and_metrics(outputs, batch)
    return (jax.numpy.where(batch['nan'].any(), jax.numpy.nan, loss) if 'nan' in batch else loss,
            metrics)


def test_non_finite_loss_stops_naming_the_step(tmp_path, monkeypatch):
  build = tasks.build
  monkeypatch.setattr(tasks, 'build', lambda c: _NanAt(build(c), step=4))
  with pytest.raises(trainer.NonFiniteLossError, match=r'non-finite loss at step 4 '):
    trainer.train_and_evaluate(smoke_config(steps=6), str(tmp_path / 'stop'))


def test_non_finite_steps_can_be_skipped(tmp_path, monkeypatch, capsys):
  """Skipping step 4 leaves the parameters as after step 3: the step-5 update starts from them."""
  build = tasks.build
  monkeypatch.setattr(tasks, 'build', lambda c: _NanAt(build(c), step=4))
  final = trainer.train_and_evaluate(smoke_config(steps=6, skip_nonfinite=True),
                                     str(tmp_path / 'skip'))
  assert 'Skipped step 4' in capsys.readouterr().out
  assert final['step'] == 6 and np.isfinite(final['eval/loss'])
  assert sorted(losses(tmp_path / 'skip')) == [1, 2, 3, 5, 6]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  """Two micro-batches of 4 take the same optimizer step as one batch of 8."""
  finals = [trainer.train_and_evaluate(smoke_config(steps=3, grad_accum_steps=n),
                                       str(tmp_path / f'accum{n}')) for n in (1, 2)]
  np.testing.assert_allclose(finals[0]['eval/loss'], finals[1]['eval/loss'], rtol=1e-5)


def test_bfloat16_compute_trains(tmp_path):
  config = smoke_config(steps=3, dtype='bfloat16')
  final = trainer.train_and_evaluate(config, str(tmp_path / 'bf16'))
  assert np.isfinite(final['train/loss'])
  assert os.path.exists(tmp_path / 'bf16' / 'tensorboard')


def test_eval_overrides_and_variants_change_only_evaluation(tmp_path):
  """eval.attention_kw changes the eval model (scale 0: uniform attention), not training; each eval
  variant is evaluated on the same batches beside it, under eval/<name>/."""
  base = trainer.train_and_evaluate(smoke_config(steps=2), str(tmp_path / 'base'))
  config = smoke_config(steps=2)
  config.eval.attention_kw.scale = 0.0
  config_lib.add_eval_variant(config, 'trained', scale=1 / np.sqrt(16))
  config_lib.add_eval_variant(config, 'uniform', scale=0.0)
  other = trainer.train_and_evaluate(config, str(tmp_path / 'other'))
  assert losses(tmp_path / 'base') == losses(tmp_path / 'other')
  assert base['eval/loss'] != other['eval/loss']
  assert other['eval/uniform/loss'] == other['eval/loss']
  np.testing.assert_allclose(other['eval/trained/loss'], base['eval/loss'], rtol=1e-6)
  with pytest.raises(ValueError, match=r"eval variant 'x': unknown dense hyper-parameters \['window'\]"):
    config_lib.add_eval_variant(smoke_config(steps=2), 'x', window=3)


@pytest.mark.slow
def test_performer_features_are_redrawn_by_the_trainer(tmp_path):
  """redraw_every=2: the same losses as never redrawing up to step 2, different from step 3 on."""
  runs = {}
  for every in (0, 2):
    config = smoke_config(steps=4, attention='performer',
                          attention_kw={'redraw_every': every, 'nb_features': 8})
    trainer.train_and_evaluate(config, str(tmp_path / f'every{every}'))
    runs[every] = losses(tmp_path / f'every{every}')
  assert runs[0][1] == runs[2][1] and runs[0][2] == runs[2][2]
  assert runs[0][3] != runs[2][3]


@pytest.mark.parametrize('task, arg, model, match', [
    ('bytes_lm', 'attention=xl', {'mem_len': -1}, r'model.mem_len=-1 must be an int >= 0'),
    ('duplication', 'attention=xl', {'mem_len': 4, 'positions': 'none'},
     r"needs batch rows that are contiguous streams; task 'duplication' has none"),
    ('bytes_lm', 'attention=dense', {'mem_len': 4, 'positions': 'none'},
     r"needs an attention family with relative positions; got 'dense'; valid: \['xl'\]"),
    ('bytes_lm', 'attention=xl', {'mem_len': 4, 'positions': 'sinusoidal'},
     r"needs model.positions='none'"),
])
def test_memory_settings_are_checked(tmp_path, task, arg, model, match):
  config = smoke_config(task=task, arg=arg)
  if task == 'bytes_lm':
    config.task.corpus = byte_corpus(tmp_path, 1600)
  config.model.update(model)
  with pytest.raises(ValueError, match=match):
    trainer.check_memory(config, tasks.build(config))


def test_eval_may_use_a_longer_memory(tmp_path):
  """eval.mem_len sets the evaluation's memory only; the train state keeps model.mem_len."""
  config = smoke_config(task='bytes_lm', arg='attention=xl,mem_len=8')
  config.task.corpus = byte_corpus(tmp_path, 1600)
  config.eval.mem_len = 24
  run = trainer.setup(config)
  assert run.abstract.memory['hidden'].shape == (2, 8, 8, 32)  # [L, B, M, D]
  assert run.init_eval_memory()['hidden'].shape == (2, 8, 24, 32)
  config.eval.mem_len = None
  assert trainer.setup(config).init_eval_memory()['hidden'].shape == (2, 8, 8, 32)
