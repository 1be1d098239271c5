"""The Pallas chunked linear attention (interpret mode) against its XLA twin, linear._prefix.

Shapes are small and T is not a multiple of the chunk; M and H get padded to the kernels' 64 lanes.
The segment ids (chunk 16) have packed runs that cross chunk boundaries, one that starts inside a
chunk after a run that crossed into it (so the carry must be dropped, in both scan directions), one
that starts on a boundary (32), and padding runs (id 0).
"""

import jax
import jax.numpy as jnp
import pytest

from efflong.attention import Mask, linear, performer
from efflong.kernels import linear_attention
from tests.attention import arrays, close, vjp
from tests.helpers import segments

B, T, CHUNK = 2, 45, 16
# Row 0: ids 1, 2 over [0, 20), [20, 36); row 1: ids 1, 2, 3 over [0, 7), [7, 32), [32, 41).
RUNS = ((20, 16), (7, 25, 9))


def _features(kh, g, m, h, dtype=jnp.float32):
  """Non-negative features qf [B, T, K, G, M], kf [B, T, K, M], v and the cotangents of num, den."""
  qf, kf, v, dnum, dden = arrays((B, T, kh, g, m), (B, T, kh, m), (B, T, kh, h), (B, T, kh, g, h),
                                 (B, T, kh, g), seed=1)
  return (jnp.abs(qf).astype(dtype), jnp.abs(kf).astype(dtype), v.astype(dtype)), (dnum, dden)


@pytest.mark.parametrize('strict', [False, True])
def test_prefix_equals_the_xla_twin(strict):
  """Values and gradients (qf, kf, v) with random cotangents of num and den; K=1, G=2."""
  seg = segments('runs', B, T, runs=RUNS)
  args, cotangents = _features(1, 2, 8, 16)
  kernel = lambda *a: linear_attention.prefix(*a, seg, chunk=CHUNK, strict=strict)
  twin = lambda *a: linear._prefix(*a, seg, chunk=CHUNK, strict=strict)
  got, got_grads = vjp(kernel, args, cotangents)
  want, want_grads = vjp(twin, args, cotangents)
  for g, w, what in zip((*got, *got_grads), (*want, *want_grads),
                        ('num', 'den', 'dqf', 'dkf', 'dv')):
    close(g, w, what)


def test_prefix_bfloat16_inputs():
  """bf16 features: float32 outputs as from the upcast inputs; gradients come back in bf16."""
  seg = segments('runs', B, T, runs=RUNS)
  args, cotangents = _features(2, 1, 8, 8, jnp.bfloat16)
  kernel = lambda *a: linear_attention.prefix(*a, seg, chunk=CHUNK, strict=False)
  twin = lambda *a: linear._prefix(*a, seg, chunk=CHUNK, strict=False)
  got, got_grads = vjp(kernel, args, cotangents)
  want, want_grads = vjp(twin, tuple(x.astype(jnp.float32) for x in args), cotangents)
  assert got[0].dtype == jnp.float32 and all(x.dtype == jnp.bfloat16 for x in got_grads)
  for g, w, what in zip(got, want, ('num', 'den')):
    close(g, w, what)
  for g, w, what in zip(got_grads, want_grads, ('dqf', 'dkf', 'dv')):
    close(g, w, what, rtol=1e-2)


def test_linear_attend_pallas_equals_xla_gqa_packed():
  """Causal Linear Transformer, K=2 kv heads for N=4 query heads, a packed segment mask."""
  q, k, v, dout = arrays((B, T, 4, 8), (B, T, 2, 8), (B, T, 2, 8), (B, T, 4, 8), seed=2)
  mask = Mask.from_segments(segments('runs', B, T, runs=RUNS), causal=True)
  fn = lambda impl: lambda q, k, v: linear.attend(q, k, v, mask=mask, chunk=CHUNK, impl=impl)
  got, got_grads = vjp(fn('pallas'), (q, k, v), dout)
  want, want_grads = vjp(fn('xla'), (q, k, v), dout)
  close(got, want, 'out')
  for g, w, what in zip(got_grads, want_grads, 'qkv'):
    close(g, w, f'd{what}')


@pytest.mark.parametrize('kernel,causal', [('relu', True), ('softmax', False)])
def test_performer_pallas_equals_xla(kernel, causal):
  """The prefix sums performer hands the kernel: causal relu features, and the causal plus
  reversed passes of packed bidirectional softmax features (a constant scale per sequence)."""
  q, k, v = arrays((B, T, 2, 8), (B, T, 2, 8), (B, T, 2, 8), seed=3)
  w = performer.draw(jax.random.key(0), 16, 8, orthogonal=True)
  mask = Mask.from_segments(segments('packed', B, T), causal=causal)
  fn = jax.jit(lambda impl: performer.attend(q, k, v, mask=mask, projection=w, kernel=kernel,
                                              chunk=CHUNK, impl=impl), static_argnums=0)
  close(fn('pallas'), fn('xla'), 'out')


def test_causal_softmax_performer_refuses_pallas_in_one_line():
  """Its running key scale (the causal-safe stabiliser) is XLA only; 'auto' takes XLA."""
  q = jnp.ones((1, 6, 2, 4))
  call = lambda impl: performer.attend(q, q, q, mask=Mask(causal=True),
                                       projection=jnp.ones((4, 4)), impl=impl)
  with pytest.raises(ValueError, match='running key scale .* has no Pallas path') as info:
    call('pallas')
  assert '\n' not in str(info.value)
  close(call('auto'), call('xla'), 'auto')


@pytest.mark.parametrize('family', ['linear', 'performer'])
def test_bad_impl_is_one_clear_line(family):
  q = jnp.ones((1, 6, 2, 4))
  call = {'linear': lambda: linear.attend(q, q, q, mask=Mask(causal=True), impl='triton'),
          'performer': lambda: performer.attend(q, q, q, mask=Mask(causal=True),
                                                projection=jnp.ones((4, 4)), impl='triton')}
  with pytest.raises(ValueError, match=r"impl='triton' \(config.model.attention_impl\); valid: "
                                       r"\['xla', 'pallas', 'auto'\]") as info:
    call[family]()
  assert '\n' not in str(info.value)
