"""Kernel calls split over the batch on several devices (`kernels.batch_sharded`).

XLA cannot partition a compiled kernel's custom call; `kernels.partition()` is True there (GPU,
several devices). Forced on here, the interpreted kernels must run per device on their own rows:
no all-gather in the program, and values and gradients as on one device.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from efflong import kernels
from efflong.attention import Mask, linear, local
from tests.attention import arrays, close, vjp

FAMILIES = {'flash (local)': functools.partial(local.attend, window=5, block=16),
            'linear': functools.partial(linear.attend, chunk=16)}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_kernel_calls_split_over_the_batch(monkeypatch, name):
  monkeypatch.setattr(kernels, 'partition', lambda: True)
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  rows = NamedSharding(mesh, PartitionSpec('data'))
  q, k, v, dout = arrays((4, 40, 4, 8), (4, 40, 2, 8), (4, 40, 2, 8), (4, 40, 4, 8))
  ids = jnp.ones((4, 40), jnp.int32).at[:, 20:].set(2).at[0, 37:].set(0)
  mask = Mask.from_segments(jax.device_put(ids, rows), causal=True)
  fn = functools.partial(FAMILIES[name], mask=mask)
  want, want_grads = vjp(functools.partial(fn, impl='xla'), (q, k, v), dout)
  sharded = [jax.device_put(x, rows) for x in (q, k, v, dout)]
  pallas = functools.partial(fn, impl='pallas')
  got, got_grads = vjp(pallas, tuple(sharded[:3]), sharded[3])
  close(got, want, 'out')
  for what, g, w in zip('qkv', got_grads, want_grads):
    close(g, w, f'd{what}')
  hlo = jax.jit(lambda *a: vjp(pallas, a[:3], a[3])).lower(*sharded).compile().as_text()
  assert 'all-gather' not in hlo
  assert got.sharding.spec[0] == 'data'
