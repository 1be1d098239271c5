"""Post-training quantization (efflong.compress.quantize) and quantization-aware training.

One tiny float LM (1 layer, d_model 32, 2 heads, d_ff 64, vocab 32, T 16) is built once; each test
quantizes it and inspects the stored parameters or runs it eagerly on one small batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import errors, models
from efflong.compress import cli, quantize
from efflong.infer import decode, generate
from tests.train import load_config_module

T, V = 16, 32
EPS32 = float(jnp.finfo(jnp.float32).eps)


@pytest.fixture(scope='module')
def config():
  c = load_config_module('bytes_lm').get_config(f'smoke,seq_len={T},layers=1')
  c.task.vocab_size = V
  return c


@pytest.fixture(scope='module')
def model(config):
  return models.build(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def tokens():
  return jax.random.randint(jax.random.key(1), (2, T), 0, V)


@pytest.fixture(scope='module')
def int8(model, config):
  return quantize.ptq(model, 'int8', quantize.sample_batch(config))


def _get(state, path: str):
  """The array of an nnx state at a '/'-joined path."""
  for key in path.split('/'):
    state = state[int(key) if key.isdigit() else key]
  return state[...]


def _dtypes(model) -> dict[str, str]:
  """{'/'-joined param path: dtype name} of model's stored parameters."""
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p[:-1]): x.dtype.name
          for p, x in flat}


def test_int8_head_within_the_rounding_bound(model, config, tokens):
  """Only the output head in int8: its logits move by at most the derived bound.

  qwix stores W_q = s * round(W / s) with s_j = max_i |W_ij| / 127.5 per output channel j (its
  int8 range is [-127.5, 127.5]; +-127.5 rounds to +-128, which int8 saturates to 127 at the
  top: still half a step), so |dW_ij| <= s_j / 2. The head's input h (the final norm's output)
  is the float model's, so |dlogit_j| = |sum_i h_i dW_ij| <= s_j / 2 * ||h||_1, plus float32
  rounding of the two dot products, at most D * eps * sum_i |h_i| |W_ij| each (the standard
  gamma_D bound).
  """
  q = quantize.ptq(model, 'mixed', quantize.sample_batch(config),
                   rules=[('embedder/head', 'int8')])
  batch = {'inputs': tokens}
  h = model.stack(model.embedder.encode(tokens, None, None), segment_ids=None, key=None)
  w = model.embedder.head.kernel[...]
  scale = _get(nnx.state(q), 'embedder/head/kernel/array/scale')  # [1, V]
  np.testing.assert_allclose(scale[0], jnp.abs(w).max(0) / 127.5, rtol=1e-6)
  l1 = jnp.abs(h).sum(-1, keepdims=True)                      # [B, T, 1]
  rounding = 2 * w.shape[0] * EPS32 * (jnp.abs(h) @ jnp.abs(w))
  bound = scale[0] / 2 * l1 + rounding
  delta = jnp.abs(q(batch) - model(batch))
  assert bool((delta <= bound).all()), float((delta / bound).max())
  assert float(delta.max()) > 0  # the head was rounded


def test_int8_is_the_float_model_on_rounded_kernels(model, int8, tokens):
  """Every kernel (q, k, v, o, wi, wo, head) is stored as int8 values and per-output-channel
  scales within s / 2 of the float kernel (and float32 rounding), and the int8 forward equals the
  float forward on the dequantized kernels (to float32 reassociation: x (q s) vs (x q) s): with
  the bound above for one layer, the whole model's error is the propagation of these roundings
  only."""
  state, rounded = nnx.state(int8), nnx.clone(model)
  paths = models.layer_paths(model)
  assert len(paths) == 7
  for path in paths:
    qvalue = _get(state, f'{path}/kernel/array/qvalue')
    scale = _get(state, f'{path}/kernel/array/scale')
    assert qvalue.dtype == jnp.int8
    w = _get(nnx.state(model), f'{path}/kernel')
    dequantized = qvalue.astype(jnp.float32) * scale
    # Half a step, plus float32 rounding of w / s (two roundings: 1 / s and the product).
    assert bool((jnp.abs(dequantized - w) <= scale / 2 + 2 * EPS32 * jnp.abs(w)).all()), path
    layer = dict(nnx.iter_modules(rounded))[tuple(int(k) if k.isdigit() else k
                                                  for k in path.split('/'))]
    layer.kernel[...] = dequantized
  np.testing.assert_allclose(int8({'inputs': tokens}), rounded({'inputs': tokens}), rtol=1e-5,
                             atol=1e-5)
  assert quantize.param_bytes(int8) < quantize.param_bytes(model) / 2


def test_int8_model_within_the_first_order_bound(model, int8, tokens):
  """The whole int8 model's logits move by at most the first-order bound of its kernels' rounding.

  Each kernel entry moves by at most s / 2 (the test above), so to first order a logit moves by
  at most b = sum_w |d logit / d w| s_w / 2 (the triangle inequality over the Jacobian, taken at
  the float kernels). The remainder is second order in the steps (s / 2 is 1/255 of a channel's
  largest weight): 10% slack covers it, and 1e-5 the float32 rounding of the two forwards.
  """
  paths = models.layer_paths(model)
  graphdef, state = nnx.split(model)
  name = lambda path: '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path[:-1])

  def logits(kernels):
    swap = lambda path, x: kernels.get(name(path).removesuffix('/kernel'), x)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(swap, state))(
        {'inputs': tokens[:1]})

  kernels = {p: _get(state, f'{p}/kernel') for p in paths}
  jacobian = jax.jit(jax.jacrev(logits))(kernels)             # {path: [1, T, V, *kernel]}
  bound = sum((jnp.abs(jacobian[p]) * _get(nnx.state(int8), f'{p}/kernel/array/scale') / 2
               ).reshape(1, T, V, -1).sum(-1) for p in paths)
  delta = jnp.abs(int8({'inputs': tokens[:1]}) - logits(kernels))
  assert bool((delta <= 1.1 * bound + 1e-5).all()), float((delta / bound).max())
  assert float((delta / bound).max()) > 0.01  # the bound is not vacuous


def test_mixed_rules_put_the_named_layers_in_the_named_precisions(model, config, tokens):
  rules = [('stack/layers/0/ff/wi', 'int4'), ('stack/layers/0/self_attn/(q|k)', 'w8a8'),
           'embedder/embed=bf16', ('embedder/head', 'fp32'), ('stack/.*/wo', 'int8')]
  q = quantize.ptq(model, 'mixed', quantize.sample_batch(config), rules=rules)
  dtypes = {p: d for p, d in _dtypes(q).items() if 'norm' not in p and not p.endswith('bias')}
  as_int8, as_int4 = ({'qvalue': q, 'scale': 'float32'} for q in ('int8', 'int4'))
  expected = {'embedder/embed/embedding': 'bfloat16', 'embedder/head/kernel': 'float32',
              'stack/layers/0/self_attn/v/kernel': 'float32',
              'stack/layers/0/self_attn/o/kernel': 'float32'}
  for layer, stored in (('ff/wi', as_int4), ('ff/wo', as_int8), ('self_attn/q', as_int8),
                        ('self_attn/k', as_int8)):
    expected.update({f'stack/layers/0/{layer}/kernel/array/{k}': d for k, d in stored.items()})
  assert dtypes == expected
  # w8a8 differs from int8 in the activations only: the same stored q, different outputs.
  q8 = quantize.ptq(model, 'mixed', quantize.sample_batch(config),
                    rules=[('stack/layers/0/self_attn/q', 'int8')])
  assert not np.allclose(q({'inputs': tokens}), q8({'inputs': tokens}))
  default = _dtypes(quantize.ptq(model, 'mixed', quantize.sample_batch(config)))
  assert default['embedder/embed/embedding'] == default['embedder/head/kernel'] == 'bfloat16'
  assert {default[f'{p}/kernel/array/qvalue'] for p in models.layer_paths(model)
          if p != 'embedder/head'} == {'int8'}


def test_bad_input_is_one_line(model, config):
  batch = quantize.sample_batch(config)
  cases = [(dict(method='int3'), "unknown quantization method 'int3'; valid: ['bf16', 'int8'"),
           (dict(method='mixed', rules=[('stack/.*/nothing', 'int8')]),
            "rule 'stack/.*/nothing'=int8 matches no matmul layer"),
           (dict(method='mixed', rules=[('embedder/embed', 'int8')]),
            "rule 'embedder/embed'=int8 matches no matmul layer"),
           (dict(method='mixed', rules=['.*=int2']), "unknown precision 'int2'"),
           (dict(method='int8', rules=[('.*', 'int8')]), 'rules apply to method mixed')]
  for kw, message in cases:
    with pytest.raises(errors.Error) as e:
      quantize.ptq(model, kw.pop('method'), batch, **kw)
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  with pytest.raises(errors.Error, match='stack/layers/0/ff/wi'):  # lists the layer paths
    quantize.ptq(model, 'mixed', batch, rules=[('nothing', 'bf16')])


def test_save_load_round_trip_is_bit_exact(model, config, tmp_path):
  """The compress command's save, then generate.load_model, which rebuilds the quantized model
  from the config's compress section."""
  rules = [('stack/layers/0/ff/wi', 'int4'), ('embedder/embed', 'bf16'), ('.*', 'int8')]
  q = quantize.ptq(model, 'mixed', quantize.sample_batch(config), rules=rules)
  config = config.copy_and_resolve_references()
  config.compress = {'method': 'mixed', 'rules': rules}
  cli.save(q, config, str(tmp_path / 'q'), 1, {})
  loaded, _ = generate.load_model(str(tmp_path / 'q'))
  saved, back = nnx.state(q), nnx.state(loaded)
  assert jax.tree.structure(saved) == jax.tree.structure(back)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and bool((a == b).all())
  assert {a.dtype.name for a in jax.tree.leaves(back)} == {'float32', 'bfloat16', 'int8', 'int4'}
  with pytest.raises(errors.Error, match='already holds checkpoints'):
    cli.save(q, config, str(tmp_path / 'q'), 1, {})


def test_decoding_runs_quantized(model, int8, tokens):
  """Greedy generate through the int8 model (prefill and decode_step call its quantized
  __call__) picks the int8 forward's argmax, and scores its tokens with the int8 logits, not the
  float model's."""
  prompt, new = T - 3, 3  # seq is [2, T]: the shapes the eager forwards already ran
  out = decode.generate(int8, tokens[:, :prompt], [prompt, prompt], max_new_tokens=new)
  seq = jnp.concatenate([tokens[:, :prompt], jnp.asarray(out.tokens)], 1)
  logp = {name: jax.nn.log_softmax(m({'inputs': seq})[:, prompt - 1:-1])
          for name, m in (('int8', int8), ('float', model))}
  np.testing.assert_array_equal(out.tokens, jnp.argmax(logp['int8'], -1))
  score = {name: jnp.take_along_axis(lp, jnp.asarray(out.tokens)[..., None], -1).sum((1, 2))
           for name, lp in logp.items()}
  np.testing.assert_allclose(out.scores, score['int8'], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out.scores, score['float'], rtol=1e-5, atol=1e-5)


def test_sensitivity_quantizes_one_layer_at_a_time(model, config, tokens):
  batch = {'inputs': tokens}
  reference = model(batch)
  eval_fn = lambda m: float(jnp.abs(m(batch) - reference).mean())
  rows = quantize.sensitivity(model, 'int4', eval_fn, quantize.sample_batch(config))
  assert sorted(p for p, _ in rows) == sorted(models.layer_paths(model))
  deltas = [d for _, d in rows]
  assert deltas == sorted(deltas, reverse=True) and min(deltas) > 0
  path, delta = rows[0]
  one = quantize.ptq(model, 'mixed', quantize.sample_batch(config), rules=[(path, 'int4')])
  assert delta == pytest.approx(eval_fn(one))


def test_qat_trains_with_fake_quantized_kernels(config, model, int8, tokens):
  """models.build with qat.method=int8: the same float parameters, a forward equal to the int8
  PTQ model's (fake quantization rounds the kernels as PTQ stores them) and straight-through
  gradients for every kernel."""
  qat_config = config.copy_and_resolve_references()
  qat_config.qat.method = 'int8'
  qat = models.build(qat_config, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(qat)) == jax.tree.structure(nnx.state(model))
  batch = {'inputs': tokens}
  graphdef, params = nnx.split(qat)

  @jax.jit
  def loss_and_grads(params):
    logits = lambda p: (lambda out: (out.std(), out))(nnx.merge(graphdef, p)(batch))
    return jax.value_and_grad(logits, has_aux=True)(params)

  (_, logits), grads = loss_and_grads(params)
  np.testing.assert_allclose(logits, int8(batch), rtol=1e-5, atol=1e-5)
  for path in models.layer_paths(model):
    assert float(jnp.abs(_get(grads, f'{path}/kernel')).max()) > 0, path
  with pytest.raises(errors.Error, match="unknown qat.method 'int3'"):
    qat_config.qat.method = 'int3'
    models.build(qat_config, rngs=nnx.Rngs(0))
