"""optax AdamW (decaying only the kernels) with linear warmup then cosine / rsqrt / constant,
global-norm clipping, an optional L1 penalty on the kernels and optional pruning masks
(efflong.compress.prune)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from efflong import errors
from efflong import params as params_lib
from efflong.compress import prune as prune_lib

SCHEDULES = ('cosine', 'rsqrt', 'constant')


def schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate per step: linear warmup over warmup_steps, then the named decay."""
  if cfg.schedule not in SCHEDULES:
    raise errors.Error(f'unknown train.schedule {cfg.schedule!r}; valid: {list(SCHEDULES)}.')
  lr, warm = cfg.learning_rate, max(cfg.warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, lr, warm)
  if cfg.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, max(cfg.steps - warm, 1))
  elif cfg.schedule == 'rsqrt':
    decay = lambda step: lr * jnp.sqrt(warm / (step + warm))
  else:
    decay = optax.constant_schedule(lr)
  return optax.join_schedules([warmup, decay], [warm])


def make(cfg: ml_collections.ConfigDict,
         prune: ml_collections.ConfigDict | None = None) -> optax.GradientTransformation:
  """The optimizer for config.train (and config.prune): weight decay reaches the kernels only
  (`efflong.params.kernel_mask`).

  Token embeddings, position tables, norms and biases are not decayed: the common choice for norms
  and biases everywhere, and for embeddings in many trainers (others, BERT's among them, decay
  the embedding table too).

  The chain: L1 penalty (train.l1 > 0), global-norm clipping (train.grad_clip > 0), AdamW, pruning
  masks (prune.method != 'none'). The L1 subgradient joins the gradient first because it is the
  gradient of a term of the objective (loss + l1 * sum |w|): clipping then bounds the objective's
  whole gradient, as it would if the penalty were added to the loss. Pruning comes last so that
  nothing after it can move a masked weight off zero (efflong.compress.prune.transform).

  Raises:
    errors.Error: a bad train.l1 or prune setting (prune_lib.check), in one line.
  """
  parts = [prune_lib.l1_penalty(cfg.l1)] if cfg.l1 else []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=params_lib.kernel_mask))
  if prune is not None:
    prune_lib.check(prune)  # also with method 'none': a sparsity set without a method is refused
    if prune.method != 'none':
      parts.append(prune_lib.transform(prune))
  return optax.chain(*parts)
