"""The optimizer: weight decay reaches exactly the kernels of projections and feed-forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import errors, models
from efflong import params as params_lib
from efflong.train import optim
from tests.train import load_config_module

# Per layer: the attention projections and the feed-forward.
LAYER_KERNELS = ('ff.wi.kernel', 'ff.wo.kernel', 'self_attn.k.kernel', 'self_attn.o.kernel',
                 'self_attn.q.kernel', 'self_attn.v.kernel')


def _params(task: str, arg: str, **model) -> nnx.State:
  """The parameters of configs/<task>.py:smoke,<arg> (model.* overridden), split as the trainer
  splits them, with every value 1 (so that any decay moves it)."""
  config = load_config_module(task).get_config(f'smoke,{arg}')
  with config.unlocked():
    config.model.update(model)
  _, params, _ = nnx.split(models.build(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  return jax.tree.map(jnp.ones_like, params)


def _path(path) -> str:
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _layers(*names: str) -> list[str]:
  return [f'stack.layers.{i}.{n}' for i in range(2) for n in (*LAYER_KERNELS, *names)]


CASES = {
    # Transformer-XL: its u and v (content_bias, pos_bias) are not decayed, its W_R is.
    'xl_lm': (('bytes_lm', 'attention=xl,mem_len=8', {}),
              ['embedder.head.kernel', *_layers('self_attn.family_module.pos_proj')]),
    # Tied embedding and learned positions (not decayed); Linformer's E, F (length, not decayed).
    'linformer_encoder': (('duplication', 'attention=linformer,fill',
                           dict(positions='learned', tie_embeddings=True)), _layers()),
}


@pytest.mark.parametrize('name', CASES)
def test_weight_decay_reaches_exactly_the_kernels(name):
  (task, arg, model), want = CASES[name]
  params = _params(task, arg, **model)
  mask = params_lib.kernel_mask(params)
  assert sorted(_path(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m) == sorted(want)

  # The optimizer itself: with zero gradients, only decayed parameters move (step 0 has lr 0).
  config = load_config_module(task).get_config('smoke')
  with config.unlocked():
    config.train.update(weight_decay=0.5, warmup_steps=1, schedule='constant')
  tx = optim.make(config.train)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = tx.update(zeros, state, params)
  moved = [_path(p) for p, u in jax.tree_util.tree_leaves_with_path(
      updates, is_leaf=lambda x: isinstance(x, nnx.Variable)) if np.abs(u[...]).max() > 0]
  assert sorted(moved) == sorted(want)


def test_a_parameter_without_logical_names_is_refused():
  params = {'w': nnx.Param(jnp.ones((2, 2)))}
  with pytest.raises(errors.Error, match=r"parameter \['w'\] has no logical axis names"):
    params_lib.kernel_mask(params)
