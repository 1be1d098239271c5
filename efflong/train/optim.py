"""optax AdamW with linear warmup then cosine / rsqrt / constant, and global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('cosine', 'rsqrt', 'constant')


def schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate per step: linear warmup over warmup_steps, then the named decay."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f'unknown train.schedule {cfg.schedule!r}; valid: {list(SCHEDULES)}.')
  lr, warm = cfg.learning_rate, max(cfg.warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, lr, warm)
  if cfg.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, max(cfg.steps - warm, 1))
  elif cfg.schedule == 'rsqrt':
    decay = lambda step: lr * jnp.sqrt(warm / (step + warm))
  else:
    decay = optax.constant_schedule(lr)
  return optax.join_schedules([warmup, decay], [warm])


def make(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer for config.train; weight decay applies to matrices only (not norms, biases)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)

