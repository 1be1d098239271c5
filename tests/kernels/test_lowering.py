"""The kernels lower for the GPU: jax.export to platform 'cuda' runs Pallas' Triton lowering on the
CPU (block shapes, dtypes, control flow). Compiling the Triton IR to PTX needs a GPU and is not
checked here; experiments/bench/kernels.py runs them there.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from efflong import kernels
from efflong.attention import Mask, bigbird, dense, linear, local, longformer, lsh, sparse

TRITON = [export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
  """Kernels as the GPU would run them: not interpreted."""
  monkeypatch.setattr(kernels, 'interpret', lambda: False)


SEG = jnp.ones((1, 300), jnp.int32)
CASES = {
    'dense-causal-64': (functools.partial(dense.attend, mask=Mask(causal=True)), 64, 2),
    'dense-packed-128': (functools.partial(dense.attend,
                                           mask=Mask.from_segments(SEG, causal=False)), 128, 4),
    'local-per-head': (functools.partial(local.attend, mask=Mask(causal=True), window=32,
                                         dilation=(1, 2, 1, 2), block=32), 64, 2),
    'longformer': (functools.partial(longformer.attend, mask=Mask(causal=False), window=32,
                                     global_tokens=2, separate_global=False, block=32), 96, 2),
    'strided': (functools.partial(sparse.strided, mask=Mask(causal=True), stride=32, block=32),
                64, 2),
    'linear-causal': (functools.partial(linear.attend, mask=Mask.from_segments(SEG, causal=True)),
                      64, 2),
    'bigbird-per-head': (functools.partial(bigbird.attend, mask=Mask(causal=False), window=1,
                                           random_blocks=1, block=32), 64, 2),
    'lsh': (functools.partial(lsh.attend, mask=Mask.from_segments(SEG, causal=True),
                              rng=jax.random.key(0), n_hashes=2, bucket_size=32,
                              allow_duplicates=True), 64, 4),
}


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower_to_triton(name, dtype):
  """T = 300 pads to tiles (not to a power of two); head dim 96 pads to 128."""
  fn, h, kv_heads = CASES[name]
  q = jnp.zeros((1, 300, 4, h), dtype)
  k = q if name == 'lsh' else jnp.zeros((1, 300, kv_heads, h), dtype)
  loss = lambda q, k, v: fn(q, k, v, impl='pallas').astype(jnp.float32).sum()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  module = export.export(grad, platforms=['cuda'], disabled_checks=TRITON)(q, k, k).mlir_module()
  assert module.count('__gpu$xla.gpu.triton') >= 3  # forward, dq, dk/dv
