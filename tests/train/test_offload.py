"""train.offload_optimizer: the optimizer state in host memory between steps trains as on the
device (a restore into host memory: tests/train/test_multiprocess.py's cross-topology test)."""

import types

import jax
import numpy as np
import pytest

from efflong.train import sharding, trainer
from tests.train import smoke_config


def _train(offload: bool) -> tuple[list[float], trainer.TrainState]:
  """3 steps of the trainer's own jit'd step on data 2 x fsdp 2 (the host copies are sharded over
  fsdp too): the losses and the last state."""
  config = smoke_config(offload_optimizer=offload)
  config.mesh.update(data=2, fsdp=2)
  run = trainer.setup(config)
  state, data, losses = run.init(), iter(run.task.train_dataset(0, 1)), []
  for _ in range(3):
    state, _, scalars = run.train_step(state, sharding.global_batch(next(data), run.batch_sharding))
    losses.append(float(scalars['loss']))
  return losses, state


@pytest.mark.slow  # The fast suite restores into host memory (test_multiprocess.py).
def test_host_optimizer_state_trains_as_on_the_device():
  (device, on_device), (host, on_host) = _train(False), _train(True)
  np.testing.assert_allclose(host, device, rtol=1e-6)
  memory_kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
  assert memory_kinds(on_host.opt_state) == {trainer.HOST_MEMORY}
  assert memory_kinds(on_host.params) == memory_kinds(on_device.opt_state) == {'device'}


def test_a_backend_without_host_memory_is_refused():
  memory = lambda kind: types.SimpleNamespace(kind=kind)
  device = types.SimpleNamespace(platform='neuron',
                                 addressable_memories=lambda: [memory('device')])
  with pytest.raises(ValueError, match=r"^train.offload_optimizer=True needs 'pinned_host' memory; "
                                       r"the neuron backend's devices have \['device'\].$"):
    trainer.check_host_memory([device])
  trainer.check_host_memory(jax.devices())  # the CPU backend has it
