"""The config skeleton every task config starts from, and the `key=value,flag` argument parser.

A task config (configs/<task>.py) parses its argument with `parse_arg(arg, ARGS)`, which turns
`attention=lsh,seq_len=1024,smoke` into typed values and refuses keys the config does not declare,
then calls `base(task_name)` and fills in its own values.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from efflong import attention, errors

# Logical axis -> mesh axis. Parameters are sharded over `fsdp` on their embed axis and over `model`
# on heads / mlp / vocab (Megatron-style); activations' batch axis over (data, fsdp), their length
# axis over `context` (context parallelism: the attention layer runs its family's context twin).
# A parameter's length axis (a learned position table, Linformer's projections) is `max_len`: kept
# whole on every context shard, since decoding and shorter batches read it at any position.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', 'context'),
    ('max_len', None),
    ('embed', 'fsdp'),
    ('heads', 'model'),
    ('head_dim', None),
    ('mlp', 'model'),
    ('vocab', 'model'),
)


def load_module(path: str) -> types.ModuleType:
  """A config file (configs/<task>.py) as a module: its get_config and, if any, get_sweep."""
  spec = importlib.util.spec_from_file_location(
      f'efflong_config_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str, defaults: dict[str, Any]) -> dict[str, Any]:
  """Parses 'a=1,b=x,flag' against defaults; returns defaults updated.

  Values take the type of their default (bool flags may be given bare: `smoke` = `smoke=True`).

  Raises:
    ValueError: a key not in defaults, or a value that does not parse as its default's type.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or '').split(','))):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise errors.Error(f'unknown config argument {key!r}; valid: {sorted(defaults)}.')
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise errors.Error(f'config argument {key!r} needs a value ({key}=...).')
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise errors.Error(f'config argument {key}={value!r} is not a bool (true/false).')
      out[key] = value.lower() in ('true', '1')
    elif default is None or isinstance(default, str):
      out[key] = value
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise errors.Error(f'config argument {key}={value!r} is not a '
                           f'{type(default).__name__}.') from None
  return out


def _field_type(hint: Any) -> type:
  """`float | None` -> float; a union of several types or a generic alias (tuple[int, ...]) -> object."""
  args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
      types.UnionType, typing.Union) else [hint]
  return args[0] if len(args) == 1 and isinstance(args[0], type) and not typing.get_args(
      args[0]) else object


def attention_defaults(name: str, *, inherit: bool = False) -> ml_collections.ConfigDict:
  """The hyper-parameters a family's attend takes, with their defaults, as a ConfigDict.

  Every key is overridable from the command line; a misspelled one is an error (the dict is locked
  with the rest of the config). A hyper-parameter without a default is None here and must be set
  (binding says so otherwise). With inherit=True every value is a typed None placeholder: the
  eval-time overrides, where None means "as in training".
  """
  kw = ml_collections.ConfigDict()
  for p, hint in attention.get(name).hyper_parameters().values():
    default = None if inherit or p.default is inspect.Parameter.empty else p.default
    kw[p.name] = config_dict.FieldReference(default, field_type=_field_type(hint))
  return kw


def base(task_name: str) -> ml_collections.ConfigDict:
  """The skeleton shared by every task, with defaults: seed, task (its name only), model, train, eval,
  mesh, sharding rules."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ml_collections.ConfigDict({'name': task_name})

  c.model = ml_collections.ConfigDict(dict(
      kind='lm',                  # lm | encoder | encoder_decoder | classifier | dual_encoder
      num_layers=2,
      d_model=128,
      num_heads=4,
      num_kv_heads=0,             # 0: as many as num_heads; fewer: grouped-query attention
      head_dim=0,                 # 0: d_model // num_heads (structured head pruning sets it)
      d_ff=512,
      attention='dense',          # a name in efflong.attention.names()
      attention_impl='xla',       # xla | pallas | auto (Pallas on the GPU where the family has a
                                  # kernel, efflong.kernels; elsewhere XLA)
      dropout_rate=0.0,
      norm='pre',                 # pre | post
      activation='gelu',          # gelu | relu
      positions='sinusoidal',     # sinusoidal (tensor2tensor's) | sinusoidal_paper | learned | none
      tie_embeddings=False,
      pooling='mean',             # classifier, dual_encoder: mean | first | cls (per packed example)
      classifier_mlp_dim=0,       # their head: Dense(m), ReLU, ..., Dense(classes); 0: one Dense
      dtype='float32',            # compute dtype; parameters stay float32
      reversible=False,           # reversible residual layers (pre-LN): activation memory flat in depth
      ff_chunk_size=0,            # feed-forward over length chunks of this size (0: whole sequence)
      mem_len=0,                  # Transformer-XL segment memory (0: none); attention 'xl',
                                  # positions 'none' and a task with contiguous rows (bytes_lm)
      remat='none',               # none | full | dots | offload: what each block saves for the
                                  # backward (jax.checkpoint policies); the reversible stack recomputes
  ))
  c.model.attention_kw = attention_defaults('dense')

  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=32,              # global, over all devices and processes
      grad_accum_steps=1,         # micro-batches per optimizer step
      learning_rate=1e-3,
      schedule='cosine',          # cosine | rsqrt | constant (each after linear warmup)
      warmup_steps=100,
      weight_decay=0.0,
      b1=0.9,
      b2=0.98,
      grad_clip=1.0,              # global-norm clip; 0 disables
      skip_nonfinite=False,       # skip a step with a non-finite loss instead of stopping
      log_every=50,
      eval_every=500,
      checkpoint_every=1000,
      keep_checkpoints=2,
      l1=0.0,                     # L1 penalty on the kernels (efflong.compress.prune); 0: none
      init_from='',               # a run's workdir: start (not resume) from its latest parameters
      offload_optimizer=False,    # optimizer state in host memory (pinned_host) between steps
      distributed_timeout_s=100,  # several processes: one silent this long is lost, and the others
                                  # stop naming it (efflong.main; relaunch to resume)
  ))
  c.eval = ml_collections.ConfigDict(dict(steps=4, batch_size=32))
  c.eval.attention_kw = attention_defaults('dense', inherit=True)
  c.eval.variants = ml_collections.ConfigDict()  # {name: attention_kw overrides}: add_eval_variant
  c.eval.mem_len = config_dict.placeholder(int)  # None: model.mem_len (XL may evaluate longer)
  # Compression while training (efflong/compress): distillation from a trained teacher, pruning
  # masks held by the optimizer, quantization-aware training.
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir='',         # '': no distillation
      temperature=2.0,            # T: softmax(teacher / T) against softmax(student / T)
      alpha=0.5,                  # loss = alpha T^2 KL + (1 - alpha) task loss
  ))
  c.prune = ml_collections.ConfigDict(dict(
      method='none',              # none | magnitude | nm
      sparsity=0.0,               # final sparsity s_f of the kernels, in [0, 1)
      initial_sparsity=0.0,       # s_i at begin_step (gradual: Zhu & Gupta's cubic schedule)
      begin_step=0,
      end_step=0,                 # end_step == begin_step: one-shot at begin_step
      frequency=100,              # steps between mask updates while gradual
      scope='global',             # global | layer: one magnitude threshold, or one per kernel
      n=2, m=4,                   # nm: n nonzeros in every group of m along the reduction axis
  ))
  c.qat = ml_collections.ConfigDict(dict(method='none'))  # none | int8 | w8a8 | int4 (fake quant)
  # context: context parallelism, the length axis of activations split over devices (ring, halo or
  # prefix-state exchange per family; efflong.attention.context).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, context=1))
  c.sharding_rules = DEFAULT_RULES
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks c to what the tests run: a tiny model (d_model 32, 2 heads), 6 steps of 8 examples,
  logs, evals and checkpoints every 3 steps, one eval batch of 8."""
  c.model.d_model, c.model.num_heads, c.model.d_ff = 32, 2, 64
  c.train.steps, c.train.batch_size, c.train.warmup_steps = 6, 8, 2
  c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 3
  c.eval.steps, c.eval.batch_size = 1, 8


def set_attention(c: ml_collections.ConfigDict, name: str) -> None:
  """Selects an attention family and resets both attention_kw sections to its hyper-parameters."""
  c.model.attention = name
  c.model.attention_kw = attention_defaults(name)
  c.eval.attention_kw = attention_defaults(name, inherit=True)
  c.eval.variants = ml_collections.ConfigDict()


def add_eval_variant(c: ml_collections.ConfigDict, name: str, **overrides: Any) -> None:
  """Also evaluates every checkpoint with these attention_kw overrides, reported as
  eval/<name>/<metric> (e.g. Reformer's Table 2: train with n_hashes=1, evaluate with 1, 2, 4, 8).

  Call after set_attention; the overrides are checked against the family's hyper-parameters.
  """
  if not re.fullmatch(r'[\w.+-]+', name):
    raise errors.Error(f'eval variant name {name!r} must be letters, digits and ._+- only.')
  kw = attention_defaults(c.model.attention, inherit=True)
  unknown = sorted(set(overrides) - set(kw))
  if unknown:
    raise errors.Error(f'eval variant {name!r}: unknown {c.model.attention} hyper-parameters '
                       f'{unknown}; valid: {sorted(kw)}.')
  kw.update(overrides)
  c.eval.variants[name] = kw
