"""The attention registry: lookup errors, hyper-parameter binding, config defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import config_dict

from efflong import attention
from efflong import config as config_lib
from efflong.attention import Family, Mask, dense


def test_dense_is_registered():
  assert 'dense' in attention.names()
  assert attention.names() == sorted(attention.names())
  assert attention.get('dense').attend is dense.attend


def test_unknown_family_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown attention 'nope'.*known: \[.*'dense'"):
    attention.get('nope')


def test_a_name_registers_once():
  with pytest.raises(ValueError, match="'dense' is already registered"):
    attention.register(Family('dense', dense.attend))
  assert attention.get('dense').attend is dense.attend  # The failed call changed nothing.


def test_bind_rejects_unknown_keywords_naming_them_and_the_valid_ones():
  family = attention.get('dense')
  with pytest.raises(TypeError,
                     match=r"'dense' got unknown keyword\(s\) \['window'\]; it takes \['scale'\]"):
    family.bind(causal=True, window=4, scale=1.0)
  # `mask` is passed per call, never bound.
  with pytest.raises(TypeError, match=r"\['mask'\]"):
    family.bind(causal=True, mask=Mask())


def test_bind_fixes_hyper_parameters():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 2, 4)), jnp.float32) for _ in range(3))
  mask = Mask(causal=False)
  uniform = attention.get('dense').bind(causal=False, scale=0.0)(q, k, v, mask=mask)
  # Scale 0: every key weighs the same, so each query gets the mean value.
  mean = jnp.broadcast_to(v.mean(1, keepdims=True), v.shape)
  np.testing.assert_allclose(uniform, mean, atol=1e-6)
  default = attention.get('dense').bind(causal=False)(q, k, v, mask=mask)
  np.testing.assert_allclose(default, dense.attend(q, k, v, mask=mask), atol=1e-6)
  assert not np.allclose(default, uniform)


def test_bind_checks_masking_direction():
  causal_only = Family('causal_only', dense.attend, bidirectional=False)
  bidirectional_only = Family('bidirectional_only', dense.attend, causal=False)
  causal_only.bind(causal=True)
  bidirectional_only.bind(causal=False)
  with pytest.raises(ValueError, match="'causal_only' does not support bidirectional"):
    causal_only.bind(causal=False)
  with pytest.raises(ValueError, match="'bidirectional_only' does not support causal"):
    bidirectional_only.bind(causal=True)


def test_attention_defaults_are_the_keyword_only_hyper_parameters():
  kw = config_lib.attention_defaults('dense')
  assert set(kw.keys()) == {'scale'}
  assert kw.scale is None
  kw.scale = 0.5  # A typed placeholder: floats are accepted ...
  assert kw.scale == 0.5
  with pytest.raises(TypeError):
    kw.scale = 'big'  # ... strings are not.
  inherit = config_lib.attention_defaults('dense', inherit=True)
  assert set(inherit.keys()) == {'scale'} and inherit.scale is None
  # A bound family accepts exactly these keys.
  attention.get('dense').bind(causal=True, **kw.to_dict())


def test_attention_defaults_unknown_family():
  with pytest.raises(ValueError, match='known'):
    config_lib.attention_defaults('nope')


def test_set_attention_resets_both_sections():
  c = config_lib.base('t')
  c.model.attention_kw.scale = 2.0
  config_lib.set_attention(c, 'dense')
  assert c.model.attention == 'dense'
  assert c.model.attention_kw.scale is None and c.eval.attention_kw.scale is None
  assert isinstance(c.eval.attention_kw, config_dict.ConfigDict)


def test_module_hyper_parameters_join_the_config_and_reach_only_the_module():
  """performer: nb_features, orthogonal, redraw_every belong to its module, not to attend."""
  family = attention.get('performer')
  kw = config_lib.attention_defaults('performer')
  assert sorted(kw) == ['chunk', 'kernel', 'nb_features', 'orthogonal', 'redraw_every']
  assert 'projection' not in kw   # An input the module makes, not a hyper-parameter.
  with pytest.raises(TypeError, match=r"it takes \['chunk', 'kernel', 'nb_features', 'orthogonal', "
                                      r"'redraw_every'\]"):
    family.bind(causal=True, nb_feature=8)
  attend = family.bind(causal=True, nb_features=8, kernel='relu')
  assert attend.keywords == {'kernel': 'relu', 'impl': 'xla'}  # impl: Family.bind's choice
  module = family.make_module({'nb_features': 8, 'redraw_every': 5, 'kernel': 'relu'}, d_model=8,
                              num_heads=2, num_kv_heads=2, head_dim=4, dtype=jnp.float32,
                              rngs=nnx.Rngs(0))
  assert module.projection[...].shape == (8, 4) and module.redraw_every == 5


def test_a_new_family_leaves_the_other_families_per_step_draws_unchanged(monkeypatch):
  """A family's per-step key depends on its name, not on its place in the registry: LSH's hash
  keys are the same with a throwaway family registered ahead of every other."""
  model = nnx.List([attention.get('lsh').make_module({}, rngs=nnx.Rngs(0))])

  def hash_key_after_a_step() -> np.ndarray:
    attention.before_step(model, jax.random.key(5), jnp.int32(1))
    return np.asarray(model[0].key[...])

  alone = hash_key_after_a_step()
  seen = []
  registry = dict(attention._REGISTRY)  # pylint: disable=protected-access
  monkeypatch.setattr(attention, '_REGISTRY', {})  # restored (without the throwaway) at the end
  attention.register(Family('throwaway', dense.attend,
                             before_step=lambda model, key, step: seen.append(key)))
  attention._REGISTRY.update(registry)  # pylint: disable=protected-access
  np.testing.assert_array_equal(hash_key_after_a_step(), alone)
  assert len(seen) == 1
