"""Trainer tests share tiny smoke configs."""

import os

import ml_collections

from efflong import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config_module(name: str):
  """configs/<name>.py as a module."""
  return config_lib.load_module(os.path.join(ROOT, 'configs', f'{name}.py'))


def smoke_config(*, dropout_rate: float = 0.0, dtype: str = 'float32', attention: str = 'dense',
                 attention_kw: dict | None = None, arg: str = '', task: str = 'duplication',
                 **train) -> ml_collections.ConfigDict:
  """The smoke config of configs/<task>.py (plus config argument `arg`), logging every step, with
  train.* overrides."""
  config = load_config_module(task).get_config(f'smoke,attention={attention},{arg}')
  with config.unlocked():
    config.model.attention_kw.update(attention_kw or {})
    config.model.dropout_rate = dropout_rate
    config.model.dtype = dtype
    config.train.log_every = 1
    config.train.checkpoint_every = 100
    config.train.eval_every = 100
    config.train.update(train)
  return config
