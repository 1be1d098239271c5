"""train.offload_optimizer: the optimizer state in host memory between steps trains as on the
device (a restore into host memory: tests/train/test_multiprocess.py's cross-topology test)."""

import types

import jax
import numpy as np
import pytest

from efflong.train import trainer
from tests.train import smoke_config
from tests.train.test_trainer import losses


def _config(offload: bool):
  config = smoke_config(steps=4, offload_optimizer=offload)
  config.mesh.update(data=2, fsdp=2)  # the host copies are sharded over fsdp too
  return config


def test_host_optimizer_state_trains_as_on_the_device(tmp_path):
  for offload in (False, True):
    trainer.train_and_evaluate(_config(offload), str(tmp_path / str(offload)))
  device, host = losses(tmp_path / 'False'), losses(tmp_path / 'True')
  assert device.keys() == host.keys() == set(range(1, 5))
  np.testing.assert_allclose(list(host.values()), list(device.values()), rtol=1e-6)

  shardings = trainer.setup(_config(True)).shardings
  memory_kinds = lambda tree: {s.memory_kind for s in jax.tree.leaves(tree)}
  assert memory_kinds(shardings.opt_state) == {trainer.HOST_MEMORY}
  assert memory_kinds(shardings.params) == {'device'}


def test_a_backend_without_host_memory_is_refused():
  memory = lambda kind: types.SimpleNamespace(kind=kind)
  device = types.SimpleNamespace(platform='neuron',
                                 addressable_memories=lambda: [memory('device')])
  with pytest.raises(ValueError, match=r"^train.offload_optimizer=True needs 'pinned_host' memory; "
                                       r"the neuron backend's devices have \['device'\].$"):
    trainer.check_host_memory([device])
  trainer.check_host_memory(jax.devices())  # the CPU backend has it
