"""optax AdamW (decaying only the kernels) with linear warmup then cosine / rsqrt / constant, and
global-norm clipping."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from efflong import errors

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


# The leading axes by which a kernel is contracted with an activation's features; a parameter that
# starts with one of them and has further (output) axes is a kernel.
_KERNEL_INPUTS = (('embed',), ('mlp',), ('heads', 'head_dim'))


def is_kernel(names: Sequence[str | None]) -> bool:
  """Whether a parameter with these logical axis names is a projection's or feed-forward's kernel.

  A kernel's leading axes are contracted with an activation's features ('embed', 'mlp', or the
  head space 'heads', 'head_dim') and at least one output axis follows: the q, k, v, o projections,
  Longformer's global and Transformer-XL's position projection W_R (embed, heads, head_dim), the
  feed-forward (embed, mlp), (mlp, embed), the untied output head (embed, vocab) and a classifier's
  (embed, None). Not kernels: the token embedding (vocab, embed) and position tables
  (length, embed), whose rows are looked up; Linformer's length projections E, F
  (None, None, length), indexed by position like a position table; norms and biases (one axis);
  Transformer-XL's u and v (heads, head_dim), biases added to the queries.
  """
  names = tuple(names)
  return any(names[:len(inputs)] == inputs and len(names) > len(inputs)
             for inputs in _KERNEL_INPUTS)


def decay_mask(params: Any) -> Any:
  """True for the kernels (`is_kernel`), False for every other parameter, by logical axis names.

  Args:
    params: a tree of nnx Variables carrying logical axis names (efflong.params.partitioned), such
      as the trainer's parameters, gradients and updates (their Variables keep the names).
  Returns:
    The tree with a bool in place of each Variable.
  Raises:
    errors.Error: a parameter without logical axis names, named by its path.
  """
  def decays(path, leaf) -> bool:
    names = leaf.get_metadata('out_sharding', None) if isinstance(leaf, nnx.Variable) else None
    if names is None:
      raise errors.Error(f'parameter {jax.tree_util.keystr(path)} has no logical axis names; '
                         'weight decay (and sharding) read them: create it with '
                         'efflong.params.partitioned.')
    return is_kernel(names)

  return jax.tree_util.tree_map_with_path(decays, params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def make(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer for config.train: weight decay reaches the kernels only (`decay_mask`).

  Token embeddings, position tables, norms and biases are not decayed: the common choice for norms
  and biases everywhere, and for embeddings in many trainers (others, BERT's among them, decay
  the embedding table too).
  """
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
