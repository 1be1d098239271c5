"""Training with the length split over devices (mesh.context) equals training on one device."""

import jax
import numpy as np
import pytest

from efflong.train import sharding, trainer
from tests.train import smoke_config
from tests.train.test_trainer import losses

ONE = dict(data=1, fsdp=1, context=1, model=1)


def _step_losses(config, steps: int) -> list[float]:
  """The train losses of `steps` jitted steps of the trainer's own setup (no eval, no files)."""
  run = trainer.setup(config, jax.devices())
  state, data, out = run.init(), iter(run.task.train_dataset(0, 1)), []
  for _ in range(steps):
    state, _, scalars = run.train_step(state, sharding.global_batch(next(data), run.batch_sharding))
    out.append(float(scalars['loss']))
  return out


def test_context_parallel_steps_equal_one_device():
  """2 steps of a one-layer smoke model with the length over 4 devices (ring attention) and the
  batch over the other 2, against one device."""
  results = []
  for mesh in (ONE, dict(data=2, fsdp=1, context=4, model=1)):
    config = smoke_config(dropout_rate=0.1, arg='seq_len=32,layers=1')
    with config.unlocked():
      config.mesh.update(mesh)
    results.append(_step_losses(config, 2))
  np.testing.assert_allclose(results[1], results[0], rtol=2e-5)


@pytest.mark.slow
def test_context_parallel_training_equals_one_device(tmp_path):
  """The issue's check: a whole run (train_and_evaluate) of 5 steps with mesh.context=4 (data -1:
  the remaining 2 devices) logs the losses of one device (dropout on)."""
  results = []
  for name, mesh in (('one', ONE), ('split', dict(data=-1, fsdp=1, context=4, model=1))):
    config = smoke_config(steps=5, dropout_rate=0.1)
    with config.unlocked():
      config.mesh.update(mesh)
    trainer.train_and_evaluate(config, str(tmp_path / name))
    results.append(losses(tmp_path / name))
  assert results[0].keys() == set(range(1, 6))
  np.testing.assert_allclose(list(results[1].values()), list(results[0].values()), rtol=2e-5)
