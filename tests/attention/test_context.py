"""Context parallelism: ring attention (efflong.attention.ring) and the attention layer's dispatch.

Every twin is compared with its family's attend on one device (values and the gradients of a
weighted sum w.r.t. q, k, v, float32), on the 8 fake CPU devices of conftest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from efflong import attention, config, errors
from efflong.attention import ring
from efflong.mask import Mask
from efflong.nn.attention import Attention
from efflong.train import sharding
from tests.attention import close
from tests.helpers import segments

B, T, N, H = 2, 48, 2, 8
# Runs that cross the device blocks (T_local = 6 at context 8, 12 at 4), then padding.
RUNS = ((10, 15, 18), (7, 30))


def _inputs(seed: int, t: int = T, kv_heads: int = N):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, t, N, H))
  k, v = (jax.random.normal(key, (B, t, kv_heads, H)) for key in keys[1:3])
  return q, k, v, jax.random.normal(keys[3], (B, t, N, H))


def _mask(kind: str | None, causal: bool, t: int = T) -> Mask:
  runs = RUNS if kind == 'runs' else ()
  return Mask.from_segments(segments(kind, B, t, runs=runs), causal=causal)


def _value_and_grads(attend, q, k, v, w, mask):
  """attend's output and the gradients of sum(out * w) w.r.t. q, k, v (one jit)."""
  def loss(q, k, v):
    out = attend(q, k, v, mask)
    return jnp.sum(out * w), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _sharded(twin, context: int, **hyper):
  """twin under shard_map over the first `context` devices, length split (as the layer does)."""
  mesh = Mesh(np.asarray(jax.devices()[:context]), ('context',))
  split = P(None, 'context')
  run = lambda q, k, v, mask: twin(q, k, v, mask=mask, axis_name='context', **hyper)
  return jax.shard_map(run, mesh=mesh, in_specs=(split, split, split, split), out_specs=split)


def _check_twin(family: str, context: int, causal: bool, kind: str | None, *, t: int = T,
                kv_heads: int = N, **hyper):
  fam = attention.get(family)
  q, k, v, w = _inputs(context + 10 * causal, t, kv_heads)
  mask = _mask(kind, causal, t)
  want, want_grads = _value_and_grads(lambda *a: fam.attend(*a[:3], mask=a[3], **hyper),
                                      q, k, v, w, mask)
  got, got_grads = _value_and_grads(_sharded(fam.context, context, **hyper), q, k, v, w, mask)
  what = f'{family} context={context} causal={causal} {kind}'
  close(got, want, what)
  for name, g, e in zip('qkv', got_grads, want_grads):
    close(g, e, f'{what} d{name}')


def test_ring_equals_dense_causal_packed_in_chunks(monkeypatch):
  """Zig-zag causal ring over 4 devices, packed runs across the blocks, queries in chunks (a
  bound of 48 logits: 4 or 3 queries against the 12 keys of a block, 6 against its first 6)."""
  monkeypatch.setattr(ring, 'CHUNK_LOGITS', 48)
  _check_twin('dense', 4, True, 'runs')


def test_ring_equals_dense_bidirectional_padded():
  _check_twin('dense', 4, False, 'pad')


@pytest.mark.slow
def test_ring_contiguous_when_blocks_are_odd():
  """T_local odd: no zig-zag, future blocks skipped; grouped-query heads."""
  _check_twin('dense', 4, True, 'runs', t=44, kv_heads=1)


@pytest.mark.slow
@pytest.mark.parametrize('context', [2, 4, 8])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('kind', [None, 'pad', 'runs'])
def test_ring_equals_dense_matrix(context, causal, kind):
  _check_twin('dense', context, causal, kind, kv_heads=1 if context == 2 else N)


@pytest.mark.slow
@pytest.mark.parametrize('context', [2, 8])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('family,hyper', [
    ('strided', dict(stride=5)), ('strided', dict(stride=7, factorized=True)),
    ('fixed', dict(block=8, summary=2)), ('fixed', dict(block=6, factorized=True)),
    ('bigbird', dict(window=1, block=4, random_blocks=2, global_tokens=2)),
])
def test_sparse_twins_matrix(context, causal, family, hyper):
  _check_twin(family, context, causal, 'pad', **hyper)


@pytest.mark.slow
def test_bigbird_gathered_equals_family():
  _check_twin('bigbird', 4, False, 'runs', window=1, block=4, random_blocks=2)


def test_twin_keywords_checked_at_register():
  with pytest.raises(errors.Error, match="context twin must take attend's keywords"):
    attention.Family('x', ring.attend, context=lambda q, k, v, *, mask, axis_name: q)


def _layer(family: str, **kw) -> Attention:
  return Attention(16, N, H, family=family, family_kw=kw, causal=True, dtype=jnp.float32,
                   rngs=nnx.Rngs(0))


def _traced(mesh_shape: dict[str, int], fn, *arrays):
  """fn jitted and traced under a (data, fsdp, context, model) mesh and the default rules, and
  arrays [B, T, ...] placed on it as the trainer places a batch."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {'data': 1, 'fsdp': 1, 'context': 1, 'model': 1, **mesh_shape}))
  batch = sharding.global_batch(dict(enumerate(arrays)),
                                sharding.batch_sharding(mesh, config.DEFAULT_RULES))
  return (jax.jit(sharding.traced_under(mesh, config.DEFAULT_RULES, fn)),
          *(batch[i] for i in range(len(arrays))))


@pytest.mark.parametrize('family,kw', [
    ('strided', dict(stride=5, factorized=True)),
    ('bigbird', dict(block=4, random_blocks=1, global_tokens=1))])
def test_layer_dispatch_splits_the_length(family, kw):
  """The layer under a mesh with context 4 (and data 2) equals the layer without one, and its
  lowered program passes the length's blocks between devices (a ring, or bigbird's all-gather).
  Dense through the whole trainer: tests/train/test_trainer.py::test_one_device_equals_eight."""
  layer = _layer(family, **kw)
  x = jax.random.normal(jax.random.key(1), (B, 32, 16))
  seg = segments('runs', B, 32, runs=((9, 20), (31,)))
  run = lambda x, seg: layer(x, segment_ids=seg)
  want = jax.jit(run)(x, seg)
  traced, x, seg = _traced(dict(data=2, context=4), run, x, seg)
  close(traced(x, seg), want, f'{family} layer with context=4')
  text = traced.lower(x, seg).as_text()
  assert ('all_gather' if family == 'bigbird' else 'collective_permute') in text


@pytest.mark.parametrize('family', ['xl', 'linformer'])
def test_layer_refuses_a_family_without_twin(family):
  fam = attention.get(family)
  kw = dict(k=8) if family == 'linformer' else {}
  layer = Attention(16, N, H, family=family, family_kw=kw, causal=family == 'xl',
                    max_len=32, dtype=jnp.float32, rngs=nnx.Rngs(0))
  traced, x = _traced(dict(context=2), lambda x: layer(x, segment_ids=None), jnp.ones((B, 32, 16)))
  with pytest.raises(errors.Error) as info:
    traced.lower(x)
  message = str(info.value)
  assert '\n' not in message and fam.context_why in message and repr(family) in message
  assert str(attention.names(context_parallel=True)) in message


def test_layer_refuses_a_length_the_devices_do_not_divide():
  layer = _layer('dense')
  traced, x = _traced(dict(context=4), lambda x: layer(x, segment_ids=None), jnp.ones((B, 30, 16)))
  with pytest.raises(errors.Error, match='T=30 .* multiple of 4'):
    traced.lower(x)
