"""Transformer-XL's segment memory: exact continuation, no gradient into it, resets, mem_len 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import models
from tests.train import load_config_module

T, B = 8, 2


def xl_model(**model):
  """(model config, the smoke XL model as a jit'd function (batch, memory=None) -> its output)."""
  config = load_config_module('bytes_lm').get_config(f'attention=xl,smoke,seq_len={T}')
  config.model.update(model)
  graphdef, state = nnx.split(models.build(config, rngs=nnx.Rngs(0)))

  @jax.jit
  def run(state, batch, memory):
    model = nnx.merge(graphdef, state)
    return model(batch) if memory is None else model(batch, memory=memory)

  return config.model, lambda batch, memory=None: run(state, batch, memory)


def tokens(length, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, 256)


@pytest.mark.parametrize('mem_len', [T, T + T // 2, 2 * T])
def test_segments_with_memory_equal_one_causal_pass(mem_len):
  """Relative positions make this exact: while the memory holds every earlier position, a segment
  sees the same keys, at the same distances, as the same tokens in one pass over them all."""
  cfg, model = xl_model(num_kv_heads=1)
  segments = mem_len // T + 1
  x = tokens(segments * T)
  memory, outs = models.init_memory(cfg, B, mem_len), []
  for s in range(segments):
    out, memory = model({'inputs': x[:, s * T:(s + 1) * T]}, memory=memory)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), model({'inputs': x}), atol=2e-5, rtol=1e-5)


def test_next_memory_is_the_last_layer_inputs_and_no_gradient_reaches_it():
  cfg, model = xl_model()
  memory = models.init_memory(cfg, B, T)
  memory['hidden'] = jax.random.normal(jax.random.key(1), memory['hidden'].shape)
  memory['segment_ids'] = jnp.ones_like(memory['segment_ids'])
  batch = {'inputs': tokens(T // 2)}
  _, new = model(batch, memory=memory)
  # The last T positions of [memory; segment]: half old memory, then this segment's layer inputs.
  np.testing.assert_array_equal(new['hidden'][:, :, :T // 2], memory['hidden'][:, :, T // 2:])
  np.testing.assert_array_equal(new['segment_ids'], np.ones((B, T)))
  grad = jax.grad(lambda h: model(batch, memory={**memory, 'hidden': h})[1]['hidden'].sum())(
      memory['hidden'])
  assert not np.asarray(grad).any()
  # The memory itself does reach the output (it is read, only not differentiated through).
  moved = model(batch, memory={**memory, 'hidden': memory['hidden'][..., ::-1]})[0]
  assert np.abs(np.asarray(moved - model(batch, memory=memory)[0])).max() > 1e-3


def test_reset_rows_forget_their_memory_and_mem_len_zero_is_the_plain_model():
  cfg, model = xl_model()
  batch = {'inputs': tokens(T)}
  plain = model(batch)
  memory = models.init_memory(cfg, B, T)
  memory['hidden'] = jax.random.normal(jax.random.key(1), memory['hidden'].shape)
  memory['segment_ids'] = jnp.ones_like(memory['segment_ids'])
  out, new = model({**batch, 'reset': jnp.array([True, False])}, memory=memory)
  np.testing.assert_allclose(out[0], plain[0], atol=1e-5)
  assert np.abs(np.asarray(out[1] - plain[1])).max() > 1e-3
  np.testing.assert_array_equal(new['segment_ids'][0], np.ones(T))  # row 0's own tokens only
  out, new = model(batch, memory=models.init_memory(cfg, B, 0))
  np.testing.assert_allclose(out, plain, atol=1e-6)
  assert new['hidden'].shape == (cfg.num_layers, B, 0, cfg.d_model)


def test_a_family_without_relative_positions_refuses_a_memory():
  config = load_config_module('bytes_lm').get_config(f'attention=dense,smoke,seq_len={T}')
  model = models.build(config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"attention 'dense' cannot read a segment memory; families "
                                       r"that can: \['xl'\]"):
    model({'inputs': tokens(T)}, memory=models.init_memory(config.model, B, T))
