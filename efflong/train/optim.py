"""optax AdamW (decaying only the kernels) with linear warmup then cosine / rsqrt / constant,
global-norm clipping, an optional L1 penalty on the kernels and optional pruning masks
(efflong.compress.prune)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from efflong import errors
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


# The leading axes by which a kernel is contracted with an activation's features; a parameter that
# starts with one of them and has further (output) axes is a kernel.
_KERNEL_INPUTS = (('embed',), ('mlp',), ('heads', 'head_dim'))


def kernel_inputs(names: Sequence[str | None]) -> int:
  """How many leading axes of a kernel with these logical axis names are its input (contracted)
  axes: 1 for ('embed', ...) and ('mlp', ...), 2 for ('heads', 'head_dim', ...); 0 if the
  parameter is not a kernel (`is_kernel`)."""
  names = tuple(names)
  return next((len(inputs) for inputs in _KERNEL_INPUTS
               if names[:len(inputs)] == inputs and len(names) > len(inputs)), 0)


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
  return kernel_inputs(names) > 0


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


def make(cfg: ml_collections.ConfigDict,
         prune: ml_collections.ConfigDict | None = None) -> optax.GradientTransformation:
  """The optimizer for config.train (and config.prune): weight decay reaches the kernels only
  (`decay_mask`).

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
                           mask=decay_mask))
  if prune is not None:
    prune_lib.check(prune)  # also with method 'none': a sparsity set without a method is refused
    if prune.method != 'none':
      parts.append(prune_lib.transform(prune))
  return optax.chain(*parts)
