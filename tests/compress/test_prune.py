"""Pruning: magnitude and N:M masks, the gradual schedule, masks held through training by the real
optimizer, L1, structured head and feed-forward pruning, the sparsity report, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efflong import config as config_lib
from efflong import errors, models
from efflong import params as params_lib
from efflong.compress import cli, prune
from efflong.infer import generate
from efflong.train import optim, trainer
from tests.train import load_config_module


def _var(key, shape, *names) -> nnx.Param:
  value = np.random.default_rng(key).standard_normal(shape, np.float32)
  return nnx.Param(jnp.asarray(value), out_sharding=names, eager_sharding=False)


# Every kernel layout (embed, ...), (mlp, ...), (embed, heads, head_dim), (heads, head_dim, embed),
# and non-kernels (a bias, an embedding table) that must never be pruned.
KERNELS = ('wi', 'wo', 'q', 'o')


@pytest.fixture(scope='module')
def tree():
  return {'wi': _var(0, (8, 16), 'embed', 'mlp'), 'bi': _var(1, (16,), 'mlp'),
          'wo': _var(2, (16, 8), 'mlp', 'embed'), 'q': _var(3, (8, 2, 4), 'embed', 'heads',
                                                            'head_dim'),
          'o': _var(4, (2, 4, 8), 'heads', 'head_dim', 'embed'),
          'emb': _var(5, (32, 8), 'vocab', 'embed')}


def _values(tree) -> dict:
  return {k: np.asarray(v[...]) for k, v in tree.items()}


def _prune_cfg(**kw):
  cfg = config_lib.base('bytes_lm').prune
  cfg.update(kw)
  return cfg


def _train_cfg(**kw):
  cfg = config_lib.base('bytes_lm').train
  cfg.update(dict(schedule='constant', warmup_steps=1, learning_rate=0.1, weight_decay=0.1,
                  grad_clip=0.5), **kw)
  return cfg


def test_cubic_schedule_hits_s_i_at_begin_s_f_at_end_and_rises_between():
  s = lambda t: float(prune.cubic_sparsity(t, 0.2, 0.8, 10, 30))
  assert s(0) == s(10) == pytest.approx(0.2) and s(30) == s(50) == pytest.approx(0.8)
  ramp = [s(t) for t in range(10, 31)]
  assert all(a < b for a, b in zip(ramp, ramp[1:]))
  # Zhu & Gupta eq. 1 at the midpoint: s_f + (s_i - s_f) / 8.
  assert s(20) == pytest.approx(0.8 - 0.6 / 8)
  one_shot = [float(prune.cubic_sparsity(t, 0.0, 0.5, 5, 5)) for t in (4, 5, 6)]
  assert one_shot == [0.0, 0.5, 0.5]


@pytest.mark.parametrize('scope', prune.SCOPES)
def test_magnitude_masks_hit_the_sparsity_and_keep_the_largest(tree, scope):
  masks = _values(prune.magnitude_masks(tree, 0.6, scope=scope))
  values = _values(tree)
  assert masks['bi'].all() and masks['emb'].all()
  groups = [KERNELS] if scope == 'global' else [(k,) for k in KERNELS]
  for group in groups:
    kept = np.concatenate([np.abs(values[k])[masks[k]] for k in group])
    pruned = np.concatenate([np.abs(values[k])[~masks[k]] for k in group])
    assert len(pruned) == round(0.6 * (len(kept) + len(pruned)))
    assert kept.min() > pruned.max()
  # Ties (all weights equal) still prune exactly round(s * n).
  ones = jax.tree.map(jnp.ones_like, tree)
  masks = _values(prune.magnitude_masks(ones, 0.3, scope=scope))
  sizes = [tree[k].size for k in KERNELS]
  assert sum((~masks[k]).sum() for k in KERNELS) == (
      round(0.3 * sum(sizes)) if scope == 'global' else sum(round(0.3 * n) for n in sizes))


def test_nm_masks_keep_exactly_2_of_every_4_along_the_reduction_axis(tree):
  masks, values = _values(prune.nm_masks(tree, 2, 4)), _values(tree)
  # The reduction (input) axes lead: wi, q over embed (8), wo over mlp (16), o over heads x
  # head_dim (2 x 4 = 8).
  for name, inputs in (('wi', 8), ('wo', 16), ('q', 8), ('o', 8)):
    mask = masks[name].reshape(inputs // 4, 4, -1)
    assert (mask.sum(axis=1) == 2).all(), name
    w = np.abs(values[name]).reshape(inputs // 4, 4, -1)
    assert (np.where(mask, w, np.inf).min(axis=1) > np.where(mask, -np.inf, w).max(axis=1)).all()
  assert masks['bi'].all() and masks['emb'].all()
  # The optimizer's masks for method 'nm' (one-shot at step 0) are these.
  held = prune.transform(_prune_cfg(method='nm')).init(tree).masks
  assert all((np.asarray(held[k][...]) == masks[k]).all() for k in masks)
  odd = {'w': _var(0, (6, 4), 'embed', 'mlp')}
  with pytest.raises(errors.Error, match=r"kernel w \(6, 4\) has 6 input features .* prune.m=4"):
    prune.nm_masks(odd)


def test_masked_weights_stay_exactly_zero_through_training(tree):
  """The real optimizer (L1, clipping, AdamW with weight decay, then the masks), one-shot at 0."""
  sparsity = 0.5
  tx = optim.make(_train_cfg(l1=0.01), _prune_cfg(method='magnitude', sparsity=sparsity))
  state = tx.init(tree)
  masks = _values(state[-1].masks)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, rng = tree, np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32), tree)
    params, state = step(params, state, grads)
    values = _values(params)
    for k in KERNELS:
      assert (values[k][~masks[k]] == 0).all() and (values[k][masks[k]] != 0).all(), k
    assert sum((~masks[k]).sum() for k in KERNELS) == sparsity * sum(tree[k].size for k in KERNELS)
  assert (values['bi'] != _values(tree)['bi']).all()  # not masked: trained (lr 0 at step 0)
  assert all((np.asarray(state[-1].masks[k][...]) == masks[k]).all() for k in masks)


def test_gradual_schedule_reaches_s_f_at_the_end_step(tree):
  cfg = _prune_cfg(method='magnitude', scope='layer', initial_sparsity=0.25, sparsity=0.75,
                   begin_step=2, end_step=7, frequency=2)
  tx = prune.transform(cfg)
  update = jax.jit(tx.update)
  params, state = tree, tx.init(tree)
  zeros = jax.tree.map(jnp.zeros_like, tree)
  n = tree['wi'].size
  seen = []
  for t in range(9):
    updates, state = update(zeros, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(int((np.asarray(params['wi'][...]) == 0).sum()))
  # Mask updates at 2, 4, 6 and the end step 7 (not 8); none before begin.
  want = [0, 0] + [round(float(prune.cubic_sparsity(t, 0.25, 0.75, 2, 7)) * n)
                   for t in (2, 2, 4, 4, 6, 7, 7)]
  assert seen == want and want[-1] == 0.75 * n


def test_l1_adds_l1_sign_w_to_the_kernels_only(tree):
  tx = prune.l1_penalty(0.1)
  zeros = jax.tree.map(jnp.zeros_like, tree)
  updates, _ = tx.update(zeros, tx.init(tree), tree)
  got, values = _values(updates), _values(tree)
  for k in KERNELS:
    np.testing.assert_array_equal(got[k], np.float32(0.1) * np.sign(values[k]))
  assert not got['bi'].any() and not got['emb'].any()


@pytest.mark.parametrize('train,prune_kw,message', [
    (dict(l1=-0.1), {}, r'train.l1=-0.1 must be a number >= 0'),
    ({}, dict(method='magnitude', sparsity=1.0),
     r'prune.sparsity=1.0 must be a number in \[0, 1\)'),
    ({}, dict(method='magnitude', initial_sparsity=-0.1),
     r'prune.initial_sparsity=-0.1 must be a number in \[0, 1\)'),
    ({}, dict(method='lottery'), r"unknown prune.method 'lottery'; valid: \['none'"),
    ({}, dict(method='magnitude', scope='row'), r"unknown prune.scope 'row'; valid"),
    ({}, dict(method='magnitude', begin_step=5, end_step=3),
     r'prune.end_step=3 must be an int >= prune.begin_step=5'),
    ({}, dict(method='magnitude', frequency=0), r'prune.frequency=0 must be an int >= 1'),
    ({}, dict(method='nm', n=4, m=4), r'prune.n=4, prune.m=4: need integers with 1 <= n < m'),
    ({}, dict(method='nm', sparsity=0.7), r'prune.sparsity=0.7 must be 0 or 0.5'),
    ({}, dict(sparsity=0.5), r"prune.method is 'none'"),
])
def test_bad_settings_are_one_line_errors(train, prune_kw, message):
  with pytest.raises(errors.Error, match=message) as info:
    optim.make(_train_cfg(**train), _prune_cfg(**prune_kw))
  assert '\n' not in str(info.value)


@pytest.fixture(scope='module')
def lm():
  """A tiny bytes_lm (1 layer, 4 heads of 8, d_ff 64) with random parameters (numpy's: compiling
  the initialisers takes seconds), whose head 2 and neurons 0..15 are scaled down: the ones
  structured pruning must remove."""
  config = load_config_module('bytes_lm').get_config('smoke,seq_len=16,layers=1')
  with config.unlocked():
    config.model.update(num_heads=4, d_model=32, d_ff=64)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: models.build(
      config, rngs=nnx.Rngs(0))), nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * 0.3, params)
  layer = params['stack']['layers'][0]
  for module, proj, index in [('self_attn', p, np.s_[:, 2]) for p in 'qkv'] + [
      ('self_attn', 'o', 2), ('ff', 'wi', np.s_[:, :16]), ('ff', 'wo', np.s_[:16])]:
    value = np.array(layer[module][proj]['kernel'][...])
    value[index] *= 0.01
    layer[module][proj]['kernel'][...] = value
  batch = {'inputs': jax.random.randint(jax.random.key(1), (2, 16), 0, 256)}
  forward = jax.jit(lambda graph, p, r: nnx.merge(graph, p, r)(batch), static_argnums=0)
  run = lambda graph, p, r: np.asarray(forward(graph, p, r))
  return config, graphdef, params, rest, run


def test_structured_pruning_gives_fewer_heads_and_neurons_with_the_masked_models_outputs(lm):
  config, graphdef, params, rest, run = lm
  new_config, new_params = prune.structured(config, params, heads=0.25, ff=0.5)
  assert (new_config.model.num_heads, new_config.model.head_dim, new_config.model.d_ff) == (3, 8,
                                                                                            32)
  layer = new_params['stack']['layers'][0]
  assert layer['self_attn']['q']['kernel'].shape == (32, 3, 8)
  assert layer['self_attn']['o']['kernel'].shape == (3, 8, 32)
  assert layer['ff']['wi']['kernel'].shape == (32, 32) and layer['ff']['wo']['kernel'].shape == (
      32, 32)
  masks = prune.structured_masks(config, params, heads=0.25, ff=0.5)
  layers = masks['stack']['layers']
  q, wi = (np.asarray(layers[0][m][p]['kernel'][...])
           for m, p in (('self_attn', 'q'), ('ff', 'wi')))
  assert not q[:, 2].any() and q[:, [0, 1, 3]].all()  # the scaled-down head is the one removed
  assert not wi[:, :16].any() and wi.sum() == 32 * 32  # and they among the 32 of 64 neurons
  masked = run(graphdef, prune.apply_masks(params, masks), rest)
  new_graph, _, new_rest = nnx.split(nnx.eval_shape(lambda: models.build(
      new_config, rngs=nnx.Rngs(0))), nnx.Param, ...)
  pruned = run(new_graph, new_params, new_rest)
  np.testing.assert_allclose(pruned, masked, atol=1e-5, rtol=1e-5)
  assert np.abs(pruned - run(graphdef, params, rest)).max() > 1e-4  # pruning did change it


def test_structured_pruning_refuses_families_with_per_head_state_in_one_line(lm):
  config = lm[0].copy_and_resolve_references()
  with config.unlocked():
    config.model.attention = 'xl'
  with pytest.raises(errors.Error, match=r"model.attention='xl' is not supported.*\['dense'"):
    prune.structured(config, lm[2], heads=0.25)
  with pytest.raises(errors.Error, match=r'heads=1.0 must be a number in \[0, 1\)'):
    prune.structured(lm[0], lm[2], heads=1.0)


def test_sparsity_report_counts_zeros_and_sparse_bytes(tree):
  report = prune.sparsity_report(prune.apply_masks(tree, prune.nm_masks(tree)))
  assert report['sparsity'] == 0.5 and set(report['kernels']) == set(KERNELS)
  dense = sum(v.size for v in tree.values()) * 4
  kernel = sum(tree[k].size for k in KERNELS)
  assert report['dense_bytes'] == dense
  # Bitmask: half the kernel values plus one bit each; 2:4: half the values plus 2 bits each.
  assert report['bitmask_bytes'] == dense - kernel * 4 + kernel // 2 * 4 + kernel // 8
  assert report['nm_bytes'] == dense - kernel * 4 + kernel // 2 * 4 + kernel // 2 * 2 // 8
  assert prune.sparsity_report(tree)['nm_bytes'] is None  # dense kernels are not 2:4


def test_retraining_from_a_run_holds_its_magnitude_mask(tmp_path):
  """A training run from another run's checkpoint (train.init_from) with one-shot magnitude
  pruning at 50%, through the trainer on the 8 test devices (the masks sharded like the kernels):
  after 2 steps the kernels are zero exactly where magnitude_masks of the source's parameters
  puts the mask (computed from the loaded weights, applied before the first step and held
  through the updates)."""
  config = load_config_module('bytes_lm').get_config('smoke,seq_len=16,layers=1')
  source = models.build(config, rngs=nnx.Rngs(0))
  cli.save(source, config, str(tmp_path / 'source'), 1, {})
  with config.unlocked():
    config.train.update(steps=2, init_from=str(tmp_path / 'source'), eval_every=100,
                        checkpoint_every=100)
    config.prune.update(method='magnitude', sparsity=0.5)
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  retrained, step = generate.load_model(str(tmp_path / 'run'))
  source_params = nnx.state(source, nnx.Param)
  expected = jax.tree.leaves(prune.magnitude_masks(source_params, 0.5))
  kernels = jax.tree.leaves(params_lib.kernel_mask(source_params))
  got = jax.tree.leaves(nnx.state(retrained, nnx.Param))
  assert step == 2 and sum(kernels) > 2
  for mask, value, kernel in zip(expected, got, kernels):
    if kernel:
      np.testing.assert_array_equal(np.asarray(value) != 0, np.asarray(mask))
