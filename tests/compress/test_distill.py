"""Distillation and train.init_from: the KD loss against its formula, zero gradient for a student
equal to its teacher, the one-line refusals, and distillation runs through the trainer from a
teacher trained here (bytes_lm smoke, 1 layer, T = 16)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import errors
from efflong.compress import distill
from efflong.infer import generate
from efflong.train import sharding, trainer
from efflong.train.checkpoint import Checkpoints
from tests.train import load_config_module


def smoke_config(arg: str = '', steps: int = 1, devices: int = 1, **distill_kw):
  """The bytes_lm smoke config (1 layer, T = 16) plus `arg`, logging every step, on `devices`
  devices (one by default: orbax then saves without slicing arrays, seconds faster)."""
  config = load_config_module('bytes_lm').get_config(f'smoke,seq_len=16,layers=1,{arg}')
  with config.unlocked():
    config.train.steps, config.train.log_every = steps, 1
    config.mesh.data = devices
    config.distill.update(distill_kw)
  return config


@pytest.fixture(scope='module')
def teacher(tmp_path_factory) -> str:
  """The workdir of a teacher trained for 1 step."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  trainer.train_and_evaluate(smoke_config(), workdir)
  return workdir


def test_kd_loss_is_its_formula():
  """T^2 KL(softmax(t / T) || softmax(s / T)) averaged over the weighted positions, by numpy, and
  alpha * KD + (1 - alpha) * task loss."""
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 5)) * 3, rng.normal(size=(2, 3, 5)) * 3
  w = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  temp = 2.5
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p, q = softmax(t / temp), softmax(s / temp)
  expected = temp**2 * ((p * np.log(p / q)).sum(-1) * w).sum() / w.sum()
  loss, (total, count) = jax.jit(distill.kd_loss, static_argnums=3)(s, t, w, temp)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose((total, count), (expected * 4, 4), rtol=1e-5)
  mixed, metrics = jax.jit(lambda *a: distill.distillation_loss(*a, temperature=temp, alpha=0.3))(
      s, t, 1.5, w)
  np.testing.assert_allclose(mixed, 0.3 * expected + 0.7 * 1.5, rtol=1e-5)
  np.testing.assert_allclose(metrics['kd_loss'], (expected * 4, 4), rtol=1e-5)


def test_bad_teacher_and_init_from_are_one_line(teacher, tmp_path):
  """A teacher of another vocabulary or output shape, an unreadable teacher workdir, a bad
  temperature, and an init_from run without checkpoint or of other shapes: one line each."""
  other = tmp_path / 'other_vocab'
  other.mkdir()
  saved = generate.load_config(teacher)
  saved.task.vocab_size = 128
  (other / 'config.json').write_text(saved.to_json())
  refusals = {
      'task.vocab_size=128; the student has 256': smoke_config(f'distill={other}'),
      'no config.json': smoke_config(f'distill={tmp_path / "missing"}'),
      'distill.temperature=0.0 must be > 0': smoke_config(f'distill={teacher}', temperature=0.0),
  }
  for message, config in refusals.items():
    with pytest.raises(errors.Error, match=message) as e:
      trainer.setup(config)
    assert '\n' not in str(e.value)
  with pytest.raises(errors.Error, match=r"the teacher's outputs have shape \(1, 4, 6\); the "
                     r"student's \(1, 4, 5\)"):
    distill.kd_loss(jnp.zeros((1, 4, 5)), jnp.zeros((1, 4, 6)), jnp.ones((1, 4)), 1.0)

  narrow = smoke_config('d_model=16')
  run = trainer.setup(narrow)
  for init_from, message in ((str(tmp_path / 'missing'), 'no checkpoint in'),
                             (teacher, r'params/embedder/embed/embedding has shape \(256, 32\) in '
                                       r'its checkpoint \(step 1\) and \(256, 16\) in this model')):
    with narrow.unlocked():
      narrow.train.init_from = init_from
    ckpts = Checkpoints(str(tmp_path / 'student'), keep=1)
    with pytest.raises(errors.Error, match=message) as e:
      trainer.initial_state(narrow, run, ckpts, None)
    ckpts.close()
    assert '\n' not in str(e.value)


def test_student_may_differ_from_its_teacher(teacher):
  """A 2-layer, narrower local-attention student of the 1-layer dense teacher, over 8 devices (the
  teacher restored onto them): the distillation train step traces (shapes only, no compilation)
  and reports kd_loss."""
  run = trainer.setup(smoke_config(f'd_model=16,layers=2,attention=local,distill={teacher}',
                                   devices=8))
  teacher_embedding = run.teacher[0]['embedder']['embed']['embedding'][...]
  assert teacher_embedding.shape == (256, 32) and len(teacher_embedding.sharding.device_set) == 8
  assert run.abstract.params['embedder']['embed']['embedding'].shape == (256, 16)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
           for k, v in next(iter(run.task.train_dataset(0, 1))).items()}
  _, metrics, _ = run.train_step.eval_shape(run.abstract, batch, run.teacher)
  assert metrics['kd_loss'][0].shape == () and 'loss' in metrics


def same_student(teacher: str, steps: int = 1):
  """A student of the teacher's architecture started from its parameters (train.init_from) and
  taught by it alone (alpha = 1)."""
  config = smoke_config(f'distill={teacher}', steps=steps, alpha=1.0)
  with config.unlocked():
    config.train.init_from = teacher
  return config


def test_init_from_starts_with_the_teachers_params_and_zero_gradient(teacher, tmp_path):
  """init_from restores the other run's exact parameters at step 0; the whole distillation loss
  at alpha = 1 then has zero gradient, and KD loss 0 (and another student's is not)."""
  config = same_student(teacher)
  run = trainer.setup(config)
  data = iter(run.task.train_dataset(0, 1))
  ckpts = Checkpoints(str(tmp_path), keep=1)
  state, origin = trainer.initial_state(config, run, ckpts, data)
  ckpts.close()
  assert 'step 1 of' in origin and 'train.init_from' in origin
  model, step = generate.load_model(teacher)
  assert step == 1 and int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               nnx.state(model, nnx.Param))

  batch = sharding.global_batch(next(data), run.batch_sharding)
  _, metrics, scalars = run.train_step(state, batch, run.teacher)
  kd_sum, count = jax.device_get(metrics['kd_loss'])
  assert count == batch['inputs'].size and abs(kd_sum / count) < 1e-6  # float32 rounding
  assert float(scalars['grad_norm']) < 1e-6, float(scalars['grad_norm'])
  # A student that is not its teacher (its weights doubled) is taught something: KD loss > 0.
  other = run.init()
  other = other.replace(params=jax.tree.map(lambda p: 2 * p, other.params))
  _, metrics, _ = run.train_step(other, batch, run.teacher)
  kd_sum, count = jax.device_get(metrics['kd_loss'])
  assert kd_sum / count > 0.1


def test_distillation_run(teacher, tmp_path):
  """The same student distilled for 2 steps through the trainer (the programs of the test above):
  train/kd_loss is reported beside the task loss, 0 at the first step; a resume of the run
  restores its own checkpoint, not init_from's."""
  config = same_student(teacher, steps=2)
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == 2 and 'eval/bits_per_byte' in final
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if 'train/kd_loss' in line]
  assert [r['step'] for r in rows] == [1, 2]
  assert abs(rows[0]['train/kd_loss']) < 1e-6 and np.isfinite(rows[1]['train/kd_loss'])
  assert all(np.isfinite(r['train/loss']) for r in rows)

  run, ckpts = trainer.setup(config), Checkpoints(str(tmp_path), keep=1)
  state, origin = trainer.initial_state(config, run, ckpts, iter(run.task.train_dataset(0, 1)))
  ckpts.close()
  assert int(state.step) == 2 and 'train.init_from' in origin and 'not read' in origin
