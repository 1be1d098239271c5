"""model.remat: every jax.checkpoint policy gives the plain stack's loss and gradients, and saves
memory."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import models
from efflong.nn import blocks
from tests.train import ROOT, smoke_config

B, T = 2, 12


def _loss(remat: str):
  """(loss of params, params) of a one-layer smoke LM with this remat, dropout on, a padded row."""
  config = smoke_config(arg=f'seq_len={T}', dropout_rate=0.1)
  config.model.update(remat=remat, num_layers=1)
  graphdef, params, rest = nnx.split(models.build(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  rng = np.random.default_rng(0)
  seg = np.ones((B, T), np.int32)
  seg[0, T - 4:] = 0
  batch = {'inputs': jnp.asarray(rng.integers(1, config.task.vocab_size, (B, T)), jnp.int32),
           'segment_ids': jnp.asarray(seg)}
  logits = lambda p: nnx.merge(graphdef, p, rest)(batch, key=jax.random.key(3))
  return lambda p: jnp.sum(jnp.sin(logits(p))), params


def test_every_policy_gives_the_plain_loss_and_gradients():
  """Dropout masks and padding replay exactly when the block is recomputed (one program for the
  four policies: one compilation)."""
  losses = [_loss(remat)[0] for remat in blocks.REMAT_POLICIES]
  params = _loss('none')[1]
  (want, want_g), *others = jax.jit(
      lambda p: [jax.value_and_grad(loss)(p) for loss in losses])(params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_g))
  for remat, (got, got_g) in zip(list(blocks.REMAT_POLICIES)[1:], others):
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=remat)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      assert float(jnp.abs(a - b).max()) <= 1e-6 * scale, (remat, a.shape)


def _moderate_lm(remat: str):
  """(loss of params, params) of a 4-layer LM, B 8, T 64, D 64: activations dominate."""
  config = smoke_config(arg='seq_len=64')
  config.model.update(kind='lm', remat=remat, num_layers=4, d_model=64, d_ff=128)
  graphdef, params, rest = nnx.split(models.build(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tokens = jnp.ones((8, 64), jnp.int32)
  return lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)({'inputs': tokens}))), params


def _residual_bytes(remat: str) -> tuple[int, int]:
  """(device, host) bytes of what the forward pass keeps for the backward (the vjp closure)."""
  loss, params = _moderate_lm(remat)
  jaxpr = jax.make_jaxpr(lambda p: jax.vjp(loss, p)[1])(params).jaxpr
  out = {'device': 0, 'host': 0}
  for v in jaxpr.outvars:
    host = v.aval.memory_space == jax.memory.Space.Host
    out['host' if host else 'device'] += v.aval.size * v.aval.dtype.itemsize
  return out['device'], out['host']


def test_policies_keep_fewer_residuals():
  """Residuals (tracing only): full keeps the block inputs (and parameters), dots adds the matmul
  outputs, offload moves exactly the block inputs [B, T, D] to host memory."""
  (plain, _), (full, _), (dots, _) = map(_residual_bytes, ('none', 'full', 'dots'))
  assert full < 0.2 * plain and full < dots < 0.5 * plain, (full, dots, plain)
  device, host = _residual_bytes('offload')
  block_inputs = 4 * 8 * 64 * 64 * 4
  assert host == block_inputs and device == full - block_inputs, (device, host, full)


_COMPILED_TEMP = """
import json, os
os.environ['XLA_FLAGS'] = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
import jax
from tests.nn.test_remat import _moderate_lm
def temp(remat):
  loss, params = _moderate_lm(remat)
  return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({r: temp(r) for r in ('none', 'full')}))
"""


@pytest.mark.slow
def test_full_remat_compiles_to_less_temporary_memory():
  """The compiled step's temporaries shrink with full remat. The CPU backend's default
  (concurrency-optimized) scheduler hoists the recomputation and keeps every block's activations
  (equal temporaries); its memory-minimizing scheduler, set here in a fresh process, does not."""
  out = subprocess.run([sys.executable, '-c', _COMPILED_TEMP], cwd=ROOT, capture_output=True,
                       text=True, check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  temp = json.loads(out.stdout.splitlines()[-1])
  assert temp['full'] < 0.8 * temp['none'], temp


def test_remat_errors():
  config = smoke_config()
  config.model.remat = 'some'
  with pytest.raises(ValueError, match=r"unknown model.remat 'some'; valid: \['none', 'full', "
                                       r"'dots', 'offload'\]"):
    models.build(config, rngs=nnx.Rngs(0))
  config.model.update(remat='full', reversible=True)
  with pytest.raises(ValueError, match=r"model.remat='full' needs model.reversible=False"):
    models.build(config, rngs=nnx.Rngs(0))
  assert list(blocks.REMAT_POLICIES) == ['none', 'full', 'dots', 'offload']
