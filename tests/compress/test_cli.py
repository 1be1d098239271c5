"""The compress command end to end on a tiny bytes_lm run: a compressed run that loads back."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from efflong import errors, models
from efflong import params as params_lib
from efflong.compress import cli
from efflong.infer import generate
from tests.train import load_config_module


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A run directory (config.json + checkpoint) of an untrained smoke bytes_lm model."""
  config = load_config_module('bytes_lm').get_config('smoke')
  config.eval.steps = 1
  workdir = tmp_path_factory.mktemp('source')
  cli.save(models.build(config, rngs=nnx.Rngs(0)), config, str(workdir), 1, {})
  return workdir


def _kernels(model):
  params = nnx.state(model, nnx.Param)
  is_kernel = jax.tree.leaves(params_lib.kernel_mask(params))
  return [np.asarray(leaf) for leaf, k in zip(jax.tree.leaves(params), is_kernel) if k]


def test_prune_writes_a_run_that_loads_with_the_mask(source, tmp_path):
  out = tmp_path / 'pruned'
  report = cli.compress(str(source), str(out), 'prune', sparsity=0.5, scope='global')
  assert report['sparsity']['sparsity'] == pytest.approx(0.5, abs=1e-3)
  model, step = generate.load_model(str(out))
  kernels = _kernels(model)
  zeros = sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels)
  assert step == 1 and zeros == pytest.approx(0.5, abs=1e-3)
  saved = json.loads((out / 'compress.json').read_text())
  assert set(saved['after']) == set(saved['before']) and 'eval/bits_per_byte' in saved['after']
  assert generate.load_config(str(out)).compress.method == 'prune'


def test_structured_run_loads_with_fewer_heads(source, tmp_path):
  out = tmp_path / 'structured'
  cli.compress(str(source), str(out), 'structured', heads=0.5, ff=0.5)
  config = generate.load_config(str(out))
  assert (config.model.num_heads, config.model.d_ff) == (1, 32)
  model, _ = generate.load_model(str(out))
  assert model.stack.layers[0].self_attn.q.kernel.shape == (32, 1, 16)


@pytest.mark.parametrize('method, options, message', [
    ('bogus', {}, "unknown --method='bogus'; valid: bf16"),
    ('prune', dict(sparsity=1.0, scope='global'), 'sparsity=1.0 must be a number in [0, 1)'),
])
def test_bad_input_is_one_line(source, tmp_path, method, options, message):
  with pytest.raises(errors.Error) as e:
    cli.compress(str(source), str(tmp_path / 'out'), method, **options)
  assert message in str(e.value) and '\n' not in str(e.value)
