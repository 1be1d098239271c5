"""BigBird's random blocks are drawn per layer and head (Zaheer et al. 2020, App. D)."""

import os

import jax
import numpy as np
from flax import nnx

from efflong import config as config_lib
from efflong import models
from efflong.attention import Mask, bigbird
from tests.attention import arrays

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _random_blocks(layer: int, heads: int = 2) -> np.ndarray:
  layout = bigbird.random_layout(64, heads=heads, block=4, window=1, random_blocks=2,
                                 causal=False, seed=0, layer=layer)
  return np.asarray(layout.kv_blocks)


def test_layers_and_heads_draw_their_own_blocks():
  """Two layers (and two heads of a layer) get different random blocks; a layer's are fixed."""
  first, second = _random_blocks(0), _random_blocks(1)
  assert not np.array_equal(first, second)
  assert not np.array_equal(first[0], first[1])
  assert np.array_equal(first, _random_blocks(0))


def test_a_model_numbers_its_bigbird_layers():
  """The layers of a stack get indices 0, 1, ... and so different patterns: the same input
  through two layers' attention (same q, k, v) differs."""
  config = config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config(
      'attention=bigbird,smoke,seq_len=64')
  config.model.attention_kw.update(global_tokens=0)
  model = models.build(config, rngs=nnx.Rngs(0))
  indices = [m.index for _, m in nnx.iter_graph(model) if isinstance(m, bigbird.LayerIndex)]
  assert indices == list(range(config.model.num_layers)) and len(indices) > 1
  q, k, v = arrays((1, 64, 2, 8), (1, 64, 2, 8), (1, 64, 2, 8))
  kw = dict(mask=Mask(), block=4, window=1, random_blocks=1)
  outs = [bigbird.attend(q, k, v, layer=i, **kw) for i in indices[:2]]
  assert np.abs(np.asarray(outs[0] - outs[1])).max() > 1e-3
