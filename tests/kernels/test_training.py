"""A model trains with attention_impl='pallas' and follows the XLA path's losses."""

import numpy as np
import pytest

from efflong.train import trainer
from tests.train import smoke_config
from tests.train.test_trainer import losses


# LSH: the kernel behind a sort, in a model with its hash reseeding; the block-sparse families' model
# path is the same layer code (tests/kernels/test_flash_attention.py checks each family's kernel).
@pytest.mark.slow  # ~60 s: two trainings, one through the interpreted kernels (-m slow)
@pytest.mark.parametrize('attention,attention_kw', [
    ('lsh', dict(bucket_size=16, allow_duplicates=True))])   # the -log N_ij count has no kernel
def test_pallas_training_equals_xla(tmp_path, attention, attention_kw):
  """Three steps of the duplication smoke config (8 devices, data parallel), both impls."""
  runs = {}
  for impl in ('xla', 'pallas'):
    config = smoke_config(steps=3, attention=attention, attention_kw=attention_kw)
    with config.unlocked():
      config.model.attention_impl = impl
    trainer.train_and_evaluate(config, str(tmp_path / impl))
    runs[impl] = losses(tmp_path / impl)
  assert runs['pallas'].keys() == {1, 2, 3}
  np.testing.assert_allclose(list(runs['pallas'].values()), list(runs['xla'].values()), rtol=1e-5)
