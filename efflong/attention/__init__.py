"""Attention families behind one signature, and the registry that maps config names to them.

Every family is a pure function

  attend(q, k, v, *, mask: Mask, **hyper) -> out      # q [B, T, N, H]; k, v [B, S, K, H]

registered here with what it supports. Models look families up by name and never special-case one.
A family that decodes with a cache (/work/shared/prompts/DECODE_SPEC.md) also has

  init_cache(batch, max_len, *, num_kv_heads, head_dim, dtype, **hyper) -> cache   # dict pytree
  attend_step(q, k, v, cache, *, mask: Mask, **hyper) -> (out, cache)   # q, k, v: the new positions

where cache['length'] [B] int32 counts each row's cached positions; `Family.bind_step` and
`Family.make_cache` check the hyper-parameters as `Family.bind` does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
import zlib
from typing import Any, Callable

import jax

from efflong import errors, kernels
from efflong.attention import (bigbird, context, dense, linear, linformer, local, longformer,
                               lsh, performer, relative, ring, sparse)
from efflong.mask import Mask

AttendFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Family:
  """A registered attention family.

  Attributes:
    name: config name (`config.model.attention`).
    attend: the pure attention function.
    causal: supports causal masks.
    bidirectional: supports non-causal masks.
    inputs: keyword-only arguments of attend that are data made by `module`, not hyper-parameters.
    module: None, or a factory `module(hyper, *, <its own hyper-parameters>, d_model=, num_heads=,
      num_kv_heads=, head_dim=, max_len=, stack_modules=, dtype=, rngs=)` returning None or an
      nnx.Module that owns the family's parameters; `hyper` holds attend's hyper-parameters,
      max_len the longest input the model was built for (or None), stack_modules a dict shared by
      the layers of one stack (for a module shared across layers, or None). The attention layer
      calls the module on its input x [B, T, D] and passes the returned dict of `inputs` to attend.
    unsupported_why: why the masking direction it lacks (causal or bidirectional) is refused.
    shared_qk: the keys are the queries (Reformer): the layer owns no key projection and passes
      k = q; self-attention only.
    memory: the layer may prepend a segment memory to the keys (Transformer-XL): attend takes
      S > T keys with the queries aligned at the end, and its positions are relative.
    before_step: None, or `before_step(model, key, step)`, run by the trainer inside every train
      step before the forward pass; it updates the family's module state in place (e.g. redraws
      random features). It must leave models without the family's modules unchanged.
    init_cache: None (cannot decode), or `init_cache(batch, max_len, *, num_kv_heads, head_dim,
      dtype, <some of attend's hyper-parameters>, [mem_len, segment_len])` -> the empty cache, a
      dict of arrays with static shapes holding 'length' [B] int32; every array has the batch on
      axis 0 (rows may be reordered or repeated, e.g. by beam search).
    attend_step: None (cannot decode), or `attend_step(q, k, v, cache, *, mask, <attend's
      keyword-only parameters, same defaults; impl optional>)` -> (out, new cache): attention of
      the new positions q [B, T, N, H], k, v [B, T, K, H] at absolute positions cache['length'] + i
      to the cache and themselves, causal; mask.q_segment_ids [B, T] (None: all real) is 1 on
      real new positions, 0 on right-padding (neither written nor counted).
    decode_why: why the family cannot decode (when attend_step is None).
    context: None (no context parallelism), or the family's context twin, run by the attention
      layer inside jax.shard_map when the mesh's 'context' axis has size > 1 (the length axis
      split over devices): `context(q, k, v, *, mask, axis_name, **hyper) -> out`, with q
      [B, T_local, N, H] this device's contiguous block of queries (global positions
      axis_index(axis_name) * T_local + i), k, v [B, T_local, K, H] the same block of keys, mask
      the Mask attend gets with its segment ids sliced to this block, and hyper exactly attend's
      keyword hyper-parameters and inputs; it returns this block of attend's output, and
      concatenating every device's block equals attend on the whole arrays (values and
      gradients). It names no mesh axis but axis_name. The layer passes the family's inputs
      shaped [B, T, ...] (activations) sliced like q and the others whole; the other mesh axes
      stay automatic (batch and heads keep their shardings). Its keywords are attend's plus
      axis_name (checked at register).
    context_why: why the family has no context twin (when context is None), for the one-line
      refusal of mesh.context > 1.

  A family has a Pallas path when attend takes `impl` ('xla' | 'pallas'); see `pallas`.
  """

  name: str
  attend: AttendFn
  causal: bool = True
  bidirectional: bool = True
  inputs: tuple[str, ...] = ()
  module: Callable[..., Any] | None = None
  before_step: Callable[..., None] | None = None
  unsupported_why: str = ''
  shared_qk: bool = False
  memory: bool = False
  init_cache: Callable[..., dict[str, Any]] | None = None
  attend_step: AttendFn | None = None
  decode_why: str = ''
  context: AttendFn | None = None
  context_why: str = ''

  def __post_init__(self):
    if (self.init_cache is None) != (self.attend_step is None):
      raise errors.Error(f'attention {self.name!r}: init_cache and attend_step come together.')
    if self.attend_step is not None:
      step, full = _keyword_defaults(self.attend_step), _keyword_defaults(self.attend)
      step.pop('impl', None)
      full.pop('impl', None)
      if step != full:
        raise errors.Error(f'attention {self.name!r}: attend_step takes keywords {step}, but attend '
                           f'takes {full}; they must match (impl aside).')
    if self.context is not None:
      twin, full = _keyword_defaults(self.context), _keyword_defaults(self.attend)
      if twin.pop('axis_name', None) is not inspect.Parameter.empty or twin != full:
        raise errors.Error(f'attention {self.name!r}: its context twin must take attend\'s '
                           f'keywords {full} and axis_name (no default); it takes '
                           f'{_keyword_defaults(self.context)}.')

  @property
  def pallas(self) -> bool:
    """Whether attend has a Pallas path (efflong.kernels): it takes the keyword `impl`."""
    return 'impl' in inspect.signature(self.attend).parameters

  @property
  def decode(self) -> bool:
    """Whether the family decodes with a cache (has init_cache and attend_step)."""
    return self.attend_step is not None

  @property
  def context_parallel(self) -> bool:
    """Whether the family runs with its length split over devices (has a context twin)."""
    return self.context is not None

  def hyper_parameters(self) -> dict[str, tuple[inspect.Parameter, Any]]:
    """name -> (parameter, type hint): attend's keyword-only parameters (less mask and inputs),
    then the module factory's keyword-only ones (less the layer's)."""
    out = {}
    for fn, skip in ((self.attend, {'mask', 'impl', *self.inputs}), (self.module, _LAYER_ARGS)):
      if fn is None:
        continue
      hints = typing.get_type_hints(fn)
      for p in inspect.signature(fn).parameters.values():
        if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name not in skip:
          out[p.name] = (p, hints.get(p.name, Any))
    return out

  def _module_names(self) -> set[str]:
    if self.module is None:
      return set()
    return {p.name for p in inspect.signature(self.module).parameters.values()
            if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name not in _LAYER_ARGS}

  def _check(self, causal: bool, impl: str, hyper: dict[str, Any]) -> None:
    """bind's checks (see there)."""
    params = self.hyper_parameters()
    unknown = sorted(set(hyper) - set(params))
    if unknown:
      raise errors.KeywordError(f'attention {self.name!r} got unknown keyword(s) {unknown}; it '
                                f'takes {sorted(params)}.')
    missing = sorted(name for name, (p, _) in params.items()
                     if p.default is inspect.Parameter.empty and hyper.get(name) is None)
    if missing:
      raise errors.Error(f'attention {self.name!r} needs {missing} set (model.attention_kw).')
    why = f': {self.unsupported_why}' if self.unsupported_why else ''
    if causal and not self.causal:
      raise errors.Error(f'attention {self.name!r} does not support causal masking{why}.')
    if not causal and not self.bidirectional:
      raise errors.Error(f'attention {self.name!r} does not support bidirectional attention{why}.')
    kernels.resolve(impl)  # A bad value, or 'pallas' where the kernels cannot run, stops here.
    if impl == 'pallas' and not self.pallas:
      raise errors.Error(f"attention {self.name!r} has no Pallas path (attention_impl='pallas'); "
                         f'families with one: {names(pallas=True)}.')

  def _attend_kw(self, fn: AttendFn, impl: str, hyper: dict[str, Any]) -> AttendFn:
    """fn with attend's hyper-parameters fixed (the module's own left out) and impl if it takes it."""
    own = self._module_names()
    fixed = {k: v for k, v in hyper.items() if k not in own}
    if 'impl' in inspect.signature(fn).parameters:  # 'auto' is resolved by attend (its tile).
      fixed['impl'] = impl
    return functools.partial(fn, **fixed)

  def bind(self, *, causal: bool, impl: str = 'xla', **hyper: Any) -> AttendFn:
    """Returns attend with its hyper-parameters fixed, after checking them all (the module's too).

    impl ('xla' | 'pallas' | 'auto', `config.model.attention_impl`) picks the family's Pallas
    path: 'auto' takes it where it is compiled (the GPU) and the family has one.

    Raises:
      TypeError: a hyper-parameter the family does not take.
      ValueError: a required hyper-parameter is missing or None, the family does not support
        this masking direction, or impl is 'pallas' and the family has no Pallas path.
    """
    self._check(causal, impl, hyper)
    return self._attend_kw(self.attend, impl, hyper)

  def check_decode(self) -> None:
    """Raises errors.Error, naming the family and why, if it cannot decode with a cache."""
    if not self.decode:
      why = self.decode_why or 'it has no init_cache/attend_step yet'
      raise errors.Error(f'attention {self.name!r} cannot decode with a cache: {why}; families '
                         f'that can: {names(decode=True)}.')

  def check_context(self) -> None:
    """Raises errors.Error, naming the family and why, if it has no context twin."""
    if not self.context_parallel:
      why = self.context_why or 'it has no context twin yet'
      raise errors.Error(f'attention {self.name!r} cannot split the length over devices '
                         f'(mesh.context > 1): {why}; families that can: '
                         f'{names(context_parallel=True)}.')

  def bind_context(self, *, causal: bool, impl: str = 'xla', **hyper: Any) -> AttendFn:
    """The context twin with its hyper-parameters fixed, checked as `bind` does; the returned
    function is `twin(q, k, v, *, mask, axis_name, **inputs)`.

    Raises:
      ValueError: the family has no context twin (check_context), or what bind raises.
      TypeError: a hyper-parameter the family does not take.
    """
    self.check_context()
    self._check(causal, impl, hyper)
    return self._attend_kw(self.context, impl, hyper)

  def bind_step(self, *, impl: str = 'xla', **hyper: Any) -> AttendFn:
    """attend_step with its hyper-parameters fixed, checked as `bind(causal=True, ...)` does.

    The returned function is `step(q, k, v, cache, *, mask, **inputs) -> (out, cache)`.

    Raises:
      ValueError: the family cannot decode (see check_decode), or what bind raises.
      TypeError: a hyper-parameter the family does not take.
    """
    self.check_decode()
    self._check(True, impl, hyper)
    return self._attend_kw(self.attend_step, impl, hyper)

  def make_cache(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype: Any,
                 mem_len: int | None = None, segment_len: int | None = None,
                 **hyper: Any) -> dict[str, Any]:
    """The family's empty cache for `batch` rows of up to max_len positions (init_cache).

    hyper are checked as in bind_step; init_cache gets those of them it declares, and mem_len /
    segment_len (the layer's segment memory and training segment length, Transformer-XL) only if
    it declares them.
    """
    self.check_decode()
    self._check(True, 'xla', hyper)
    takes = inspect.signature(self.init_cache).parameters
    kw = {k: v for k, v in {**hyper, 'mem_len': mem_len, 'segment_len': segment_len}.items()
          if k in takes}
    cache = self.init_cache(batch, max_len, num_kv_heads=num_kv_heads, head_dim=head_dim,
                            dtype=dtype, **kw)
    shapes = {k: tuple(v.shape) for k, v in cache.items()}
    if 'length' not in cache or any(not shape or shape[0] != batch for shape in shapes.values()):
      raise errors.Error(f'attention {self.name!r}: init_cache must give length [B] and arrays '
                         f'with the batch ({batch}) on axis 0; got shapes {shapes}.')
    return cache

  def make_module(self, hyper: dict[str, Any], **layer: Any) -> Any:
    """The family's module for one attention layer (None if it has none); see `module`."""
    if self.module is None:
      return None
    own = self._module_names()
    return self.module({k: v for k, v in hyper.items() if k not in own},
                       **{k: v for k, v in hyper.items() if k in own}, **layer)


_LAYER_ARGS = frozenset({'d_model', 'num_heads', 'num_kv_heads', 'head_dim', 'max_len',
                         'stack_modules', 'dtype', 'rngs'})
_REGISTRY: dict[str, Family] = {}


def _keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
  """name -> default (inspect.Parameter.empty if none) of fn's keyword-only parameters."""
  return {p.name: p.default for p in inspect.signature(fn).parameters.values()
          if p.kind == inspect.Parameter.KEYWORD_ONLY}


def register(family: Family) -> Family:
  """Adds a family to the registry; a name may be registered once."""
  if family.name in _REGISTRY:
    raise errors.Error(f'attention family {family.name!r} is already registered.')
  _REGISTRY[family.name] = family
  return family


def get(name: str) -> Family:
  """The family registered under name; an unknown name is an error listing the known ones."""
  if name not in _REGISTRY:
    raise errors.Error(f'unknown attention {name!r}; known: {sorted(_REGISTRY)}.')
  return _REGISTRY[name]


def names(**supports: bool) -> list[str]:
  """The registered names, sorted; with e.g. memory=True only the families whose Family field
  `memory` is True (decode=True: those that decode with a cache)."""
  return sorted(n for n, f in _REGISTRY.items()
                if all(getattr(f, k) == v for k, v in supports.items()))


def before_step(model: Any, key: Any, step: Any) -> None:
  """Runs every registered family's `before_step` hook on model (in place).

  Each family's key is `key` folded with a stable hash of its name (CRC-32; Python's hash() of a
  str is salted per process), so registering another family changes no family's draws.
  """
  for family in _REGISTRY.values():
    if family.before_step is not None:
      family.before_step(model, jax.random.fold_in(key, zlib.crc32(family.name.encode())), step)


register(Family('dense', dense.attend, init_cache=dense.init_cache,
                attend_step=dense.attend_step, context=ring.attend))
register(Family('local', local.attend, init_cache=local.init_cache,
                attend_step=local.attend_step, context=context.local_attend))
register(Family('longformer', longformer.attend, inputs=('global_qkv',),
                module=longformer.global_projections, init_cache=longformer.init_cache,
                attend_step=longformer.attend_step, context=context.longformer_attend))
register(Family('strided', sparse.strided, init_cache=dense.init_cache,
                attend_step=sparse.strided_step, context=ring.strided))
register(Family('fixed', sparse.fixed, init_cache=dense.init_cache, attend_step=sparse.fixed_step,
                context=ring.fixed))
register(Family('bigbird', bigbird.attend, inputs=('layer',), module=bigbird.layer_index,
                init_cache=dense.init_cache, attend_step=bigbird.attend_step,
                context=ring.bigbird_gathered))
register(Family('linear', linear.attend, init_cache=linear.init_cache,
                attend_step=linear.attend_step, context=context.linear_attend))
register(Family('performer', performer.attend, inputs=('projection',),
                module=performer.feature_matrix, before_step=performer.redraw,
                init_cache=performer.init_cache, attend_step=performer.attend_step,
                context=context.performer_attend))
register(Family('lsh', lsh.attend, inputs=('rng',), module=lsh.hash_rng, before_step=lsh.reseed,
                shared_qk=True, init_cache=lsh.init_cache, attend_step=lsh.attend_step,
                context_why=context.LSH_WHY))
register(Family('xl', relative.attend, inputs=('pos_proj', 'content_bias', 'pos_bias'),
                module=relative.relative_params, memory=True, init_cache=relative.init_cache,
                attend_step=relative.attend_step,
                context_why='its segment memory and relative positions span the whole segment'))
register(Family('linformer', linformer.attend, causal=False, inputs=('proj_k', 'proj_v'),
                module=linformer.projections, unsupported_why=linformer.CAUSAL_WHY,
                decode_why=f'it is not causal ({linformer.CAUSAL_WHY})',
                context_why='its projections E, F run over the whole length'))

__all__ = ['Family', 'Mask', 'get', 'names', 'register']
