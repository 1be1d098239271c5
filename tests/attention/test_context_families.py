"""Context twins of local, longformer, linear and performer (efflong.attention.context).

Each twin runs under shard_map with the length split over 2, 4 or 8 of conftest's fake CPU devices
and is compared with its family's attend on one device: values and the gradients w.r.t. q, k, v,
float32 (test_context's `_check_twin`; its runs cross the device blocks and some cover whole
blocks). The fast cases split over 4 devices; the whole matrix (2, 4, 8 devices, causal and not, no
segment ids, padding, packed runs) is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from efflong import attention, errors
from efflong.attention import performer
from efflong.mask import Mask
from tests.attention import close
from tests.attention.test_context import B, T, _check_twin, _inputs, _mask, _value_and_grads

W = performer.draw(jax.random.key(0), 16, 8, orthogonal=True)
# (family, hyper): local's halo is 14 > 12 positions per device at context 4 (two hops; 3 at 8);
# linear's chunk does not divide the blocks; performer's softmax features carry a running max.
CASES = [
    ('local', dict(window=7, dilation=2)),
    ('linear', dict(chunk=5)),
    ('performer', dict(projection=W, chunk=4)),
    ('longformer', dict(window=4, global_tokens=2, separate_global=False)),
]
MORE = [
    ('local', dict(window=5, block=16)),
    ('linear', dict(chunk=4, feature_map='relu')),
    ('performer', dict(projection=W, chunk=6, kernel='relu')),
]


# The fast cases (about 27 s of CPU together with longformer's below): local bidirectional takes
# both halos; linear and performer causal the scan of the states over the devices, performer's
# after the prefix max of its stabiliser. The reversed scans (bidirectional) are in the slow ones.
@pytest.mark.parametrize('family,hyper,causal', [(*CASES[0], False), (*CASES[1], True),
                                                 (*CASES[2], True)],
                         ids=['local-bidirectional', 'linear-causal', 'performer-causal'])
def test_twin_equals_family(family, hyper, causal):
  _check_twin(family, 4, causal, 'runs', kv_heads=1 if family == 'linear' else 2, **hyper)


@pytest.mark.slow
@pytest.mark.parametrize('context', [2, 4, 8])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('kind', [None, 'pad', 'runs'])
@pytest.mark.parametrize('family,hyper', CASES, ids=[c[0] for c in CASES])
def test_twin_equals_family_matrix(family, hyper, context, causal, kind):
  _check_twin(family, context, causal, kind, kv_heads=1 if context == 2 else 2, **hyper)


@pytest.mark.slow
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('family,hyper', MORE, ids=[c[0] for c in MORE])
def test_more_twins_equal_family(family, hyper, causal):
  _check_twin(family, 8, causal, 'runs', **hyper)


def _longformer_flags(context: int, causal: bool, kind: str | None):
  """longformer with per-example global token flags and the global projections (inputs split
  over the length as the layer splits them) against its attend on one device."""
  fam = attention.get('longformer')
  q, k, v, w = _inputs(context)
  qkv_g = tuple(0.5 * x + 0.1 for x in _inputs(context + 1)[:3])
  flags = np.zeros((B, T), bool)
  flags[0, [3, 20, 40]] = flags[1, 47] = True
  mask = _mask(kind, causal).replace(global_tokens=jnp.asarray(flags))
  hyper = dict(window=3, global_tokens=3)
  want = _value_and_grads(lambda q, k, v, mask: fam.attend(q, k, v, mask=mask, global_qkv=qkv_g,
                                                           **hyper), q, k, v, w, mask)
  split = P(None, 'context')
  twin = jax.shard_map(
      lambda q, k, v, mask, qkv_g: fam.context(q, k, v, mask=mask, axis_name='context',
                                               global_qkv=qkv_g, **hyper),
      mesh=Mesh(np.asarray(jax.devices()[:context]), ('context',)),
      in_specs=(split,) * 5, out_specs=split)
  got = _value_and_grads(lambda q, k, v, mask: twin(q, k, v, mask, qkv_g), q, k, v, w, mask)
  what = f'longformer flags context={context} causal={causal} {kind}'
  for name, g, e in zip(('out', 'dq', 'dk', 'dv'), jax.tree.leaves(got), jax.tree.leaves(want)):
    close(g, e, f'{what} {name}')


def test_longformer_flags_equal_family():
  _longformer_flags(4, True, 'runs')


@pytest.mark.slow
@pytest.mark.parametrize('context', [2, 8])
@pytest.mark.parametrize('causal,kind', [(True, None), (False, 'runs'), (False, 'pad')])
def test_longformer_flags_matrix(context, causal, kind):
  _longformer_flags(context, causal, kind)


def test_kernel_twins_refuse_pallas():
  q = jnp.ones((B, 4, 2, 8))
  with pytest.raises(errors.Error, match="runs in XLA.*'xla' or 'auto'"):
    attention.get('linear').context(q, q, q, mask=Mask(causal=True), axis_name='context',
                                    impl='pallas')


def test_lsh_refuses_in_one_line():
  with pytest.raises(errors.Error, match='lsh.*hash buckets are sorted over the whole sequence'):
    attention.get('lsh').check_context()
