"""Pruning and sparsity: magnitude and N:M masks held by the optimizer, Zhu & Gupta's gradual
schedule, an L1 penalty, structured pruning of attention heads and feed-forward neurons that
shrinks the matrices, and a sparsity report.

Only kernels are pruned (`efflong.params.is_kernel`, by logical axis names): the q, k, v, o
projections, the feed-forward, the output head. Token embeddings, position tables, norms and
biases never are.

A mask tree has the structure of the parameters (their nnx Variables kept, so that a mask carries
its kernel's logical axis names and shards like it) with a bool array in place of each value:
True = kept. Every non-kernel leaf is all True.

Pruning with retraining is one training run: `transform` (chained last by `optim.make` when
config.prune.method is not 'none') keeps the masks in the optimizer state and every masked weight
at exactly zero; with `train.init_from` the masks come from the trained parameters.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from efflong import errors, models
from efflong import params as params_lib
from efflong.params import path_keys

METHODS = ('none', 'magnitude', 'nm')
SCOPES = ('global', 'layer')
# Families whose heads do not depend on their index (no per-head pattern, random draw or
# dilation) and whose modules own no per-head parameters: removing a head leaves the other heads'
# outputs as they were. The others (xl, longformer, linformer: per-head module parameters; lsh,
# bigbird, performer: random draws over the heads; local, strided, fixed: per-head layouts as
# options) are refused.
HEAD_PRUNABLE = ('dense', 'linear')

Tree = Any  # a tree of nnx Variables carrying logical axis names (efflong.params.partitioned)


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _names(var: nnx.Variable) -> tuple:
  return tuple(var.get_metadata('out_sharding', None) or ())


def _dotted(path) -> str:
  return '.'.join(map(str, path_keys(path)))


def _check_fraction(name: str, value: Any) -> None:
  if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise errors.Error(f'{name}={value!r} must be a number in [0, 1).')


def _map_masks(fn, params: Tree) -> Tree:
  """The mask tree of params: fn(path, Variable) -> bool array at each kernel, True elsewhere."""
  kernels = jax.tree.leaves(params_lib.kernel_mask(params))
  flags = iter(kernels)

  def one(path, var):
    return var.replace(fn(path, var) if next(flags) else jnp.ones(var.shape, bool))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)


def _keep_largest(values: list[jax.Array], sparsity: Any) -> list[jax.Array]:
  """Masks keeping all but the round(sparsity * n) smallest |w| of the n weights in `values`.

  Exact: ties are broken by position (a stable sort), so exactly round(sparsity * n) weights are
  pruned; sparsity * n is computed in float32, exact below 2^24 weights (within one above).
  """
  flat = jnp.concatenate([jnp.abs(v).ravel() for v in values])
  n = flat.size
  pruned = jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  keep = jnp.zeros(n, bool).at[order].set(jnp.arange(n) >= pruned)
  splits = np.cumsum([v.size for v in values])[:-1]
  return [k.reshape(v.shape) for k, v in zip(jnp.split(keep, splits), values)]


def magnitude_masks(params: Tree, sparsity: Any, *, scope: str = 'global') -> Tree:
  """Masks keeping the largest |w| of the kernels (magnitude pruning).

  Args:
    params: the parameters (nnx Variables with logical axis names).
    sparsity: the fraction of kernel weights to prune, in [0, 1): a Python number, or a traced
      scalar (the gradual schedule's, inside jit).
    scope: 'global' (one threshold over all kernels together) or 'layer' (one per kernel).
  Returns:
    The mask tree (True: kept); exactly round(sparsity * n) weights pruned among the n weights
    of all kernels ('global') or of each kernel ('layer'), ties broken by position.
  """
  if scope not in SCOPES:
    raise errors.Error(f'unknown prune.scope {scope!r}; valid: {list(SCOPES)}.')
  if not isinstance(sparsity, jax.Array):
    _check_fraction('prune.sparsity', sparsity)
  if scope == 'layer':
    return _map_masks(lambda _, var: _keep_largest([var[...]], sparsity)[0], params)
  kernels = [v[...] for v, k in zip(jax.tree.leaves(params, is_leaf=_is_var),
                                    jax.tree.leaves(params_lib.kernel_mask(params))) if k]
  kept = iter(_keep_largest(kernels, sparsity))
  return _map_masks(lambda *_: next(kept), params)


def _as_matrix(path, var: nnx.Variable, m: int) -> tuple[jax.Array, int]:
  """A kernel as [inputs, outputs] (its leading input axes flattened, params.kernel_inputs), with
  its input size, checked divisible by m."""
  ins = params_lib.kernel_inputs(_names(var))
  size = math.prod(var.shape[:ins])
  if size % m:
    raise errors.Error(f'N:M pruning: kernel {_dotted(path)} {var.shape} has {size} input '
                       f'features ({_names(var)[:ins]}), not divisible by prune.m={m}.')
  return var[...].reshape(size, -1), size


def _check_nm(n: Any, m: Any) -> None:
  if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
    raise errors.Error(f'prune.n={n!r}, prune.m={m!r}: need integers with 1 <= n < m.')


def nm_masks(params: Tree, n: int = 2, m: int = 4) -> Tree:
  """N:M masks: of every m consecutive input features of a kernel, for each output feature, the
  n with the largest |w| are kept (NVIDIA's 2:4 sparsity along the reduction axis).

  The input (contracted) axes are a kernel's leading axes ('embed', 'mlp' or 'heads', 'head_dim';
  params.kernel_inputs), flattened: a kernel [I..., O...] is grouped as [prod(I) / m, m, prod(O)].
  Ties are broken by position, so every group keeps exactly n.

  Raises:
    errors.Error: bad n, m; a kernel whose input size is not divisible by m.
  """
  _check_nm(n, m)

  def one(path, var):
    w, size = _as_matrix(path, var, m)
    groups = jnp.abs(w).reshape(size // m, m, -1)
    rank = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1)  # 0: the largest
    return (rank < n).reshape(var.shape)

  return _map_masks(one, params)


def cubic_sparsity(step: Any, initial: float, final: float, begin: int, end: int) -> jax.Array:
  """The gradual pruning schedule of Zhu & Gupta (2017), eq. 1.

  s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 for t in [t0, t0 + n dt], here
  t0 = begin and t0 + n dt = end; t is clamped to [begin, end] (s_i before, s_f after). With
  end == begin it is one-shot: s_i before begin, s_f from begin on.

  Args:
    step: the training step t, a Python int or an int scalar (traced inside jit).
    initial, final: s_i, s_f.
    begin, end: the step range (Python ints).
  Returns:
    A float32 scalar.
  """
  step = jnp.asarray(step, jnp.float32)
  if end == begin:
    progress = (step >= begin).astype(jnp.float32)
  else:
    progress = jnp.clip((step - begin) / (end - begin), 0.0, 1.0)
  return final + (initial - final) * (1.0 - progress) ** 3


def check(cfg: ml_collections.ConfigDict) -> None:
  """Validates a prune config section, one line per bad value naming the valid range."""
  if cfg.method not in METHODS:
    raise errors.Error(f'unknown prune.method {cfg.method!r}; valid: {list(METHODS)}.')
  if cfg.scope not in SCOPES:
    raise errors.Error(f'unknown prune.scope {cfg.scope!r}; valid: {list(SCOPES)}.')
  _check_fraction('prune.sparsity', cfg.sparsity)
  _check_fraction('prune.initial_sparsity', cfg.initial_sparsity)
  _check_nm(cfg.n, cfg.m)
  if cfg.initial_sparsity > cfg.sparsity:
    raise errors.Error(f'prune.initial_sparsity={cfg.initial_sparsity} exceeds prune.sparsity='
                       f'{cfg.sparsity}; the schedule only increases the sparsity.')
  if not isinstance(cfg.begin_step, int) or cfg.begin_step < 0:
    raise errors.Error(f'prune.begin_step={cfg.begin_step!r} must be an int >= 0.')
  if not isinstance(cfg.end_step, int) or cfg.end_step < cfg.begin_step:
    raise errors.Error(f'prune.end_step={cfg.end_step!r} must be an int >= prune.begin_step='
                       f'{cfg.begin_step} (equal: one-shot).')
  if not isinstance(cfg.frequency, int) or cfg.frequency < 1:
    raise errors.Error(f'prune.frequency={cfg.frequency!r} must be an int >= 1.')
  if cfg.method == 'none' and (cfg.sparsity or cfg.initial_sparsity):
    raise errors.Error(f'prune.sparsity={cfg.sparsity} / initial_sparsity='
                       f'{cfg.initial_sparsity} are set but prune.method is \'none\'; valid '
                       f'methods: {list(METHODS[1:])}.')
  nm = 1 - cfg.n / cfg.m
  if cfg.method == 'nm' and (cfg.sparsity not in (0.0, nm) or cfg.initial_sparsity):
    raise errors.Error(f'prune.method=\'nm\' prunes {cfg.n}:{cfg.m}, a sparsity of {nm}; '
                       f'prune.sparsity={cfg.sparsity} must be 0 or {nm}, initial_sparsity 0.')


class PruneState(NamedTuple):
  """The pruning transform's state: the step counter and the masks."""
  count: jax.Array  # [] int32: updates seen (the training step of the next update)
  masks: Tree       # the mask tree (True: kept)


def _all_kept(params: Tree) -> Tree:
  return jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)


def apply_masks(params: Tree, masks: Tree) -> Tree:
  """params with every masked-out (False) entry set to zero: one-shot pruning without retraining."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, 0).astype(p.dtype), params, masks)


def held_masks_applied(params: Tree, opt_state: Any) -> Tree:
  """params with the masks that opt_state holds (a PruneState in it: `transform`) applied, so a
  run that prunes at its start steps from the pruned weights; params as they are without one."""
  held = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
          if isinstance(s, PruneState)]
  return apply_masks(params, held[0].masks) if held else params


def transform(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Pruning masks held in the optimizer state; chain it last (optim.make does).

  init(params): the masks of the initial parameters at the schedule's sparsity at step 0 (with
  begin_step 0; else nothing is pruned before begin_step): one-shot at step 0 prunes to
  prune.sparsity at once. With train.init_from the trainer passes the trained parameters.

  update(updates, state, params): returns (params + updates) * mask - params, so that every
  masked weight becomes exactly zero (p + (0 - p) == 0 in floating point) whatever the inner
  transforms (Adam, weight decay) proposed; optax.masked would pass raw gradients through instead.
  At steps begin, begin + frequency, ... and end (counted by the state) the masks are recomputed
  from the current parameters at cubic_sparsity(step): magnitude masks (prune.scope), or N:M
  masks for 'nm'. Pruned weights are zero, the smallest, so they stay pruned as the sparsity
  rises. The step counter is the state's: a step the trainer skips (non-finite loss, its
  optimizer state kept) does not advance it.

  Raises:
    errors.Error: a bad config (`check`).
  """
  check(cfg)
  begin, end, every = cfg.begin_step, cfg.end_step, cfg.frequency

  def masks_at(params, step):
    if cfg.method == 'nm':
      return nm_masks(params, cfg.n, cfg.m)
    sparsity = cubic_sparsity(step, cfg.initial_sparsity, cfg.sparsity, begin, end)
    return magnitude_masks(params, sparsity, scope=cfg.scope)

  def init(params):
    masks = masks_at(params, 0) if begin == 0 else _all_kept(params)
    return PruneState(count=jnp.zeros((), jnp.int32), masks=masks)

  def update(updates, state, params=None):
    if params is None:
      raise errors.Error('the pruning transform needs the parameters: tx.update(grads, state, '
                         'params).')
    t = state.count
    due = (t >= begin) & (t <= end) & (((t - begin) % every == 0) | (t == end))
    masks = jax.lax.cond(due, lambda: masks_at(params, t), lambda: state.masks)
    updates = jax.tree.map(lambda p, u, m: (jnp.where(m, p + u, 0) - p).astype(u.dtype),
                           params, updates, masks)
    return updates, PruneState(count=t + 1, masks=masks)

  return optax.GradientTransformation(init, update)


def l1_penalty(l1: float) -> optax.GradientTransformation:
  """Adds l1 * sign(w) to the kernels' gradients: the subgradient of l1 * sum |w| over the kernels
  (0 at w = 0). Other parameters' gradients pass unchanged (optax.masked).

  Under Adam the penalty is rescaled per coordinate like the loss gradient, and a subgradient step
  is not proximal: it drives small weights towards zero without making them exactly zero (prune
  them afterwards by magnitude). The trainer's logged grad_norm is the loss's alone.

  Raises:
    errors.Error: l1 < 0.
  """
  if not isinstance(l1, (int, float)) or l1 < 0:
    raise errors.Error(f'train.l1={l1!r} must be a number >= 0 (0: no L1 penalty).')
  add = optax.stateless(lambda updates, params: jax.tree.map(
      lambda g, p: g + l1 * jnp.sign(p).astype(g.dtype), updates, params))
  return optax.masked(add, params_lib.kernel_mask)


def _pruned_slices(config: ml_collections.ConfigDict, params: Tree, heads: float,
                   ff: float) -> dict[tuple, tuple[int, np.ndarray]]:
  """{leaf path: (axis, kept indices)} for every parameter that structured pruning slices.

  An attention layer is a module with q, v, o kernels (k too unless shared); its parameters with a
  'heads' axis lose the heads of the smallest norm of their q, k, v, o slices. A feed-forward is a
  module with wi, wo; its parameters with an 'mlp' axis lose the neurons of the smallest norm of
  their wi column and wo row.
  """
  _check_fraction('heads', heads)
  _check_fraction('ff', ff)
  model = config.model
  if heads and model.attention not in HEAD_PRUNABLE:
    raise errors.Error(f'structured head pruning of model.attention={model.attention!r} is not '
                       f'supported (per-head parameters, patterns or draws); valid: '
                       f'{list(HEAD_PRUNABLE)}, or heads=0.')
  if heads and model.num_kv_heads not in (0, model.num_heads):
    raise errors.Error(f'structured head pruning needs model.num_kv_heads=0 or num_heads='
                       f'{model.num_heads}; got {model.num_kv_heads} (grouped-query attention).')
  leaves = {path_keys(p): v
            for p, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_var)}
  kinds = (('heads', heads, 'model.num_heads', model.num_heads, 'heads', ('q', 'k', 'v', 'o')),
           ('ff', ff, 'model.d_ff', model.d_ff, 'mlp', ('wi', 'wo')))
  slices = {}
  for arg, fraction, size_name, total, axis_name, children in kinds:
    drop = math.floor(fraction * total + 0.5)  # half up: 0.25 of 2 heads drops 1
    if fraction and not drop:
      raise errors.Error(f'structured pruning {arg}={fraction} drops none of {size_name}={total}; '
                         f'valid: 0, or a fraction of at least {0.5 / total:.3g}.')
    if drop >= total:
      raise errors.Error(f'structured pruning {arg}={fraction} drops all {size_name}={total}; '
                         f'valid: a fraction below {(total - 0.5) / total:.3g}.')
    prefixes = {k[:-2] for k in leaves if k[-2:] == (children[-1], 'kernel')
                and k[:-2] + (children[0], 'kernel') in leaves}
    if drop and not prefixes:
      raise errors.Error(f'structured pruning {arg}={fraction}: the parameters have no module '
                         f'with {children[0]} and {children[-1]} kernels to prune.')
    for prefix in prefixes:
      owned = {k: v for k, v in leaves.items() if k[:len(prefix)] == prefix
               and len(k) == len(prefix) + 2 and k[len(prefix)] in children
               and axis_name in _names(v)}
      norm2 = sum(np.sum(np.square(np.asarray(v[...])),
                         axis=tuple(i for i in range(v.ndim) if i != _names(v).index(axis_name)))
                  for k, v in owned.items() if k[-1] == 'kernel')
      kept = np.sort(np.argsort(-norm2, kind='stable')[:total - drop])
      slices.update({k: (_names(v).index(axis_name), kept) for k, v in owned.items()})
  return slices


def structured_masks(config: ml_collections.ConfigDict, params: Tree, *, heads: float = 0.25,
                     ff: float = 0.5) -> Tree:
  """The mask tree of `structured`'s pruning (False on the removed heads' and neurons' slices,
  biases included): apply_masks(params, it) is the model that `structured` shrinks, unshrunk."""
  slices = _pruned_slices(config, params, heads, ff)

  def one(path, var):
    if path_keys(path) not in slices:
      return var.replace(jnp.ones(var.shape, bool))
    axis, kept = slices[path_keys(path)]
    keep = np.zeros(var.shape[axis], bool)
    keep[kept] = True
    shape = [1] * var.ndim
    shape[axis] = -1
    return var.replace(jnp.broadcast_to(keep.reshape(shape), var.shape))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)


def structured(config: ml_collections.ConfigDict, params: nnx.State, *, heads: float = 0.25,
               ff: float = 0.5) -> tuple[ml_collections.ConfigDict, nnx.State]:
  """Structured pruning that shrinks the matrices: attention heads and feed-forward neurons.

  In every attention layer the round(heads * num_heads) heads with the smallest norm of their
  q, k, v, o slices are removed (the same count in every layer: the config has one num_heads);
  in every feed-forward the round(ff * d_ff) neurons with the smallest norm of their wi column and
  wo row (wi's bias entry goes with them). The pruned model's outputs equal the original model's
  with those slices zeroed (apply_masks(params, structured_masks(...))).

  Args:
    config: the model's full config (model and task sections are read).
    params: its parameters, nnx.state(model, nnx.Param).
    heads, ff: the fractions of heads and of d_ff neurons to remove, in [0, 1).
  Returns:
    (new config: model.num_heads, head_dim (explicit, unchanged), d_ff and num_kv_heads (if it was
    num_heads) set; new params: the state of models.build(new config)'s parameters).
  Raises:
    errors.Error: a family whose heads cannot be removed (HEAD_PRUNABLE), grouped-query
      attention, a fraction outside [0, 1) or one that removes every unit.
  """
  slices = _pruned_slices(config, params, heads, ff)
  model = config.model
  new_config = copy.deepcopy(config)
  num_heads = model.num_heads - round(heads * model.num_heads)
  with new_config.unlocked():
    new_config.model.update(
        head_dim=model.head_dim or model.d_model // model.num_heads, num_heads=num_heads,
        num_kv_heads=num_heads if model.num_kv_heads == model.num_heads else model.num_kv_heads,
        d_ff=model.d_ff - round(ff * model.d_ff))
  values = {}
  for path, var in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_var):
    axis, kept = slices.get(path_keys(path), (None, None))
    values[path_keys(path)] = (var[...] if axis is None
                               else jnp.take(var[...], kept, axis=axis))
  abstract = nnx.state(nnx.eval_shape(lambda: models.build(new_config, rngs=nnx.Rngs(0))),
                       nnx.Param)

  def fill(path, var):
    value = values.get(path_keys(path))
    if value is None or value.shape != var.shape:
      raise errors.Error(f'structured pruning: the pruned model\'s {_dotted(path)} {var.shape} '
                         f'has no counterpart of that shape in the given parameters.')
    return var.replace(value)

  return new_config, jax.tree_util.tree_map_with_path(fill, abstract, is_leaf=_is_var)


def sparsity_report(params: Tree, *, n: int = 2, m: int = 4) -> dict[str, Any]:
  """The kernels' sparsity and the parameters' storage size, dense and sparse (estimates).

  Returns:
    {'kernels': {path: fraction of zeros}, 'sparsity': zeros / weights over all kernels,
     'dense_bytes': every parameter stored dense,
     'bitmask_bytes': kernels as their nonzero values plus one bit per weight, the rest dense,
     'nm_bytes': kernels in an n:m format (n of every m values along the reduction axis, each
       with a ceil(log2 m)-bit index: NVIDIA's 2:4 stores 2 bits per kept value), the rest dense;
       None if some group of m input features of some kernel has more than n nonzeros}.
  """
  _check_nm(n, m)
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_var)
  flags = jax.tree.leaves(params_lib.kernel_mask(params))
  report = {'kernels': {}, 'dense_bytes': 0, 'bitmask_bytes': 0, 'nm_bytes': 0}
  zeros = weights = 0
  for (path, var), kernel in zip(leaves, flags):
    dense = var.size * var.dtype.itemsize
    report['dense_bytes'] += dense
    if not kernel:
      report['bitmask_bytes'] += dense
      if report['nm_bytes'] is not None:
        report['nm_bytes'] += dense
      continue
    value = np.asarray(var[...])
    nonzero = int(np.count_nonzero(value))
    report['kernels'][_dotted(path)] = 1 - nonzero / var.size
    zeros, weights = zeros + var.size - nonzero, weights + var.size
    report['bitmask_bytes'] += nonzero * var.dtype.itemsize + math.ceil(var.size / 8)
    ins = math.prod(var.shape[:params_lib.kernel_inputs(_names(var))])
    fits = ins % m == 0 and np.count_nonzero(
        value.reshape(ins // m, m, -1), axis=1).max(initial=0) <= n
    if report['nm_bytes'] is not None:
      kept = var.size * n // m
      report['nm_bytes'] = (report['nm_bytes'] + kept * var.dtype.itemsize
                            + math.ceil(kept * math.ceil(math.log2(m)) / 8) if fits else None)
  report['sparsity'] = zeros / max(weights, 1)
  return report
