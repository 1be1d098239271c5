"""Trainer tests share one tiny duplication config."""

import importlib.util
import os

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config_module(name: str):
  """configs/<name>.py as a module."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def smoke_config(*, dropout_rate: float = 0.0, dtype: str = 'float32',
                 **train) -> ml_collections.ConfigDict:
  """The duplication smoke config, logging every step, with train.* overrides."""
  config = load_config_module('duplication').get_config('smoke')
  with config.unlocked():
    config.model.dropout_rate = dropout_rate
    config.model.dtype = dtype
    config.train.log_every = 1
    config.train.checkpoint_every = 100
    config.train.eval_every = 100
    config.train.update(train)
  return config
