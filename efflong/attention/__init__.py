"""Attention families behind one signature, and the registry that maps config names to them.

Every family is a pure function

  attend(q, k, v, *, mask: Mask, **hyper) -> out      # q [B, T, N, H]; k, v [B, S, K, H]

registered here with what it supports. Models look families up by name and never special-case one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

from efflong.attention import bigbird, dense, local, longformer, sparse
from efflong.attention.mask import Mask

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
    module: None, or a factory `module(hyper, d_model=, num_heads=, num_kv_heads=, head_dim=,
      dtype=, rngs=)` returning None or an nnx.Module that owns the family's parameters; the
      attention layer calls it on its input x [B, T, D] and passes the returned dict of `inputs`.
  """

  name: str
  attend: AttendFn
  causal: bool = True
  bidirectional: bool = True
  inputs: tuple[str, ...] = ()
  module: Callable[..., Any] | None = None

  def bind(self, *, causal: bool, **hyper: Any) -> AttendFn:
    """Returns attend with its hyper-parameters fixed, after checking them against its signature.

    Raises:
      TypeError: a hyper-parameter the family does not take.
      ValueError: a required hyper-parameter is missing or None, or the family does not support
        this masking direction.
    """
    params = inspect.signature(self.attend).parameters
    known = sorted(p for p, spec in params.items()
                   if spec.kind == inspect.Parameter.KEYWORD_ONLY
                   and p != 'mask' and p not in self.inputs)
    unknown = sorted(set(hyper) - set(known))
    if unknown:
      raise TypeError(f'attention {self.name!r} got unknown keyword(s) {unknown}; it takes {known}.')
    missing = sorted(p for p in known if params[p].default is inspect.Parameter.empty
                     and hyper.get(p) is None)
    if missing:
      raise ValueError(f'attention {self.name!r} needs {missing} set (model.attention_kw).')
    if causal and not self.causal:
      raise ValueError(f'attention {self.name!r} does not support causal masking.')
    if not causal and not self.bidirectional:
      raise ValueError(f'attention {self.name!r} does not support bidirectional attention.')
    return functools.partial(self.attend, **hyper)


_REGISTRY: dict[str, Family] = {}



def register(family: Family) -> Family:
  """Adds a family to the registry; a name may be registered once."""
  if family.name in _REGISTRY:
    raise ValueError(f'attention family {family.name!r} is already registered.')
  _REGISTRY[family.name] = family
  return family


def get(name: str) -> Family:
  """The family registered under name; an unknown name is an error listing the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown attention {name!r}; known: {sorted(_REGISTRY)}.')
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


register(Family('dense', dense.attend))
register(Family('local', local.attend))
register(Family('longformer', longformer.attend, inputs=('global_qkv',),
                module=longformer.global_projections))
register(Family('strided', sparse.strided))
register(Family('fixed', sparse.fixed))
register(Family('bigbird', bigbird.attend))

__all__ = ['Family', 'Mask', 'get', 'names', 'register']
