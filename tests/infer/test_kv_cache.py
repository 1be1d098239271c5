"""The int8 decoding cache (efflong.nn.kv_cache): exact requantization, the rounding bound, int8
decoding of a tiny dense LM against the float cache, its bytes, and the one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import errors
from efflong.infer import decode
from efflong.nn import kv_cache
from tests.models.test_decode import L, build, split_sequence, tokens_for

STEPS = 8  # greedy decoding steps after the prompts


def float_cache(seed: int = 0) -> dict:
  """A layer cache with k, v [2, 8, 2, 16] whose tokens' magnitudes span 2^-30..2^30, one token
  of zeros, and a length (left alone)."""
  rng = np.random.default_rng(seed)
  shape = (2, 8, 2, 16)
  k, v = (rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, shape[:3] + (1,)))
          for _ in range(2))
  k[0, 3, 1] = 0.0
  return {'k': jnp.asarray(k, jnp.float32), 'v': jnp.asarray(v, jnp.float32),
          'length': jnp.asarray([5, 8], jnp.int32)}


def test_requantizing_a_dequantized_cache_is_exact():
  q = kv_cache.quantize(float_cache())
  assert q['k'].dtype == jnp.int8 and q['k_scale'].shape == (2, 8, 2, 1)
  assert float(q['k_scale'][0, 3, 1, 0]) == 0.0  # the zero token
  again = kv_cache.quantize(kv_cache.dequantize(q))
  assert jax.tree.structure(again) == jax.tree.structure(q)
  for name in q:
    np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(q[name]), err_msg=name)


def test_rounding_error_is_at_most_half_a_step():
  """|x - q * scale| <= scale / 2 per element; float32's rounding of x / scale (< 127 * 2^-24 of
  a step) adds at most 2^-15 relative."""
  cache = float_cache(seed=1)
  q = kv_cache.quantize(cache)
  for name in kv_cache.KEYS:
    x = np.asarray(cache[name], np.float64)
    scale = np.asarray(q[f'{name}_scale'], np.float64)
    error = np.abs(x - np.asarray(q[name], np.float64) * scale)
    assert np.all(error <= scale / 2 * (1 + 2.0 ** -15)), name
    np.testing.assert_array_equal(np.max(np.abs(np.asarray(q[name])), -1)[scale[..., 0] > 0], 127)


@pytest.fixture(scope='module')
def dense_lm():
  """(config, graphdef, state) of a tiny dense LM: d_model 32, 2 heads of H = 16, 2 layers."""
  return build('dense')


def greedy_run(graphdef, state, batch, kv_dtype: str):
  """Prefill then STEPS greedy decode steps: (step logits [STEPS, B, V], tokens [STEPS, B], the
  cache after the prefill, the final cache)."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(batch['inputs'].shape[0], L, kv_dtype=kv_dtype)
  logits, prefilled = model.prefill(batch, cache)
  last = batch['segment_ids'].sum(1) - 1
  first = jnp.argmax(logits[jnp.arange(logits.shape[0]), last], -1).astype(jnp.int32)

  def step(carry, _):
    tokens, cache = carry
    out, cache = model.decode_step(tokens, cache)
    return (jnp.argmax(out, -1).astype(jnp.int32), cache), (out, tokens)

  (_, cache), (step_logits, tokens) = jax.lax.scan(step, (first, prefilled), length=STEPS)
  return step_logits, tokens, prefilled, cache


@pytest.fixture(scope='module')
def greedy_runs(dense_lm):
  """The prompts batch and greedy_run's results for each kv_dtype (one compilation each)."""
  config, graphdef, state = dense_lm
  prompt, seg, _ = split_sequence(tokens_for(config.task, seed=3))
  batch = {'inputs': prompt, 'segment_ids': seg}
  run = jax.jit(greedy_run, static_argnums=(0, 3))
  return batch, {kv: run(graphdef, state, batch, kv) for kv in kv_cache.KV_DTYPES}


def test_int8_cache_decodes_like_the_float_cache(greedy_runs):
  """Tolerance: each cached key and value moves by at most 1/254 of its token's absmax (the
  bound above), a logit q.k by at most ~0.4% of |q| |k|; through 2 layers the logits stay within
  1% of their range. The greedy tokens agree because every choice's float margin (top-1 minus
  top-2 logit) exceeds twice the largest logit change (checked: the prompts, seed 3, give margins
  of at least 0.05; a random model's closest call elsewhere can be 1e-3)."""
  batch, runs = greedy_runs
  ref_logits, ref_tokens, _, ref_cache = runs['float']
  logits, tokens, prefilled, cache = runs['int8']
  spread = float(ref_logits.max() - ref_logits.min())
  np.testing.assert_allclose(logits, ref_logits, atol=0.01 * spread, rtol=0)
  top2 = np.sort(np.asarray(ref_logits[:-1]), -1)[..., -2:]  # the last step's choice is not fed
  assert np.min(top2[..., 1] - top2[..., 0]) > 2 * np.max(np.abs(logits - ref_logits))
  np.testing.assert_array_equal(tokens, ref_tokens)
  assert not np.array_equal(logits, ref_logits)  # it did decode through int8
  for layer, before in zip(cache['layers'], prefilled['layers']):
    assert layer['self']['k'].dtype == jnp.int8
    for name in ('k', 'v', 'k_scale', 'v_scale'):  # the prompts' positions never drift
      for b, p in enumerate(batch['segment_ids'].sum(1)):
        np.testing.assert_array_equal(layer['self'][name][b, :p], before['self'][name][b, :p])
  np.testing.assert_array_equal(cache['length'], ref_cache['length'])


def test_generate_threads_kv_dtype(dense_lm, greedy_runs):
  """generate(kv_dtype='int8') writes greedy_run's int8 tokens."""
  _, graphdef, state = dense_lm
  batch, runs = greedy_runs
  model = nnx.merge(graphdef, state)
  prompts, lengths = batch['inputs'], batch['segment_ids'].sum(1)
  out = decode.generate(model, prompts, lengths, max_new_tokens=STEPS, max_len=L, kv_dtype='int8')
  np.testing.assert_array_equal(out.tokens, np.asarray(runs['int8'][1]).T)
  with pytest.raises(errors.Error, match=r"^kv_dtype='fp8'; valid: \['float', 'int8'\]\.$"):
    decode.generate(model, prompts, lengths, max_new_tokens=STEPS, kv_dtype='fp8')


def test_int8_cache_bytes(dense_lm):
  """H = 16: H int8 values and one bfloat16 scale (18 bytes) per token and kv head, against 64."""
  _, graphdef, state = dense_lm
  model = nnx.merge(graphdef, state)
  shapes = {kv: jax.eval_shape(lambda kv=kv: model.init_cache(2, 256, kv_dtype=kv))
            for kv in kv_cache.KV_DTYPES}
  sizes = {kv: kv_cache.kv_bytes(cache) for kv, cache in shapes.items()}
  # 2 layers' k, v [B=2, S=256, K=2, H=16] (and their scales [B, S, K, 1]) and four [B] int32 (the
  # layers' and the model's length, max_len).
  assert sizes['float'] == 2 * 2 * (2 * 256 * 2 * 16 * 4) + 4 * 2 * 4
  assert sizes['int8'] == 2 * 2 * (2 * 256 * 2 * (16 + 2)) + 4 * 2 * 4
  assert sizes['int8'] < 0.3 * sizes['float']


def test_bad_kv_dtypes_are_one_line_errors(dense_lm):
  _, graphdef, state = dense_lm
  with pytest.raises(errors.Error, match=r"^kv_dtype='fp8'; valid: \['float', 'int8'\]\.$"):
    nnx.merge(graphdef, state).init_cache(1, 8, kv_dtype='fp8')
  _, graphdef, state = build('linear')
  with pytest.raises(errors.Error) as info:
    nnx.merge(graphdef, state).init_cache(1, 8, kv_dtype='int8')
  message = str(info.value)
  assert '\n' not in message and "attention 'linear' caches a running state" in message
  families = kv_cache.key_value_families()
  assert {'dense', 'local', 'xl'} <= set(families) and not {'linear', 'performer'} & set(families)
  assert f'families whose caches hold them: {families}.' in message
