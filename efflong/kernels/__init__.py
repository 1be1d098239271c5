"""Pallas kernels for the hot paths; each has its XLA twin in efflong.attention.

flash_attention      block-sparse softmax attention (dense, every fixed sparse pattern, LSH after
                     its sort); twin: efflong.attention.blocksparse.attend_layout
linear_attention     chunked causal linear attention; twin: efflong.attention.linear._prefix

`config.model.attention_impl` chooses between them: 'xla', 'pallas', or 'auto' (Pallas where the
kernels are meant to be lowered, the GPU; XLA elsewhere). On the CPU a 'pallas' kernel runs in
Pallas' interpreter (how the tests run it): correct, but slow. On TPU 'pallas' is refused: the
kernels read the layout as scalars from ordinary refs and slide over whole-sequence refs, which
Mosaic would want as scalar prefetch and a key-tile grid axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

IMPLS = ('xla', 'pallas', 'auto')


def check(impl: str) -> None:
  """Raises ValueError on an impl that is not one of IMPLS."""
  if impl not in IMPLS:
    raise ValueError(f'impl={impl!r} (config.model.attention_impl); valid: {list(IMPLS)}.')


def resolve(impl: str) -> str:
  """'xla' or 'pallas': 'auto' is Pallas on the GPU (the kernels are written for its Triton
  lowering) and XLA on every other backend."""
  check(impl)
  backend = jax.default_backend()
  if impl == 'auto':
    return 'pallas' if backend == 'gpu' else 'xla'
  if impl == 'pallas' and backend == 'tpu':
    raise ValueError("attention_impl='pallas' is not available on TPU: the kernels are written "
                     "for the GPU's Triton lowering (and interpreted on the CPU); use 'xla' or "
                     "'auto'.")
  return impl


def triton(num_warps: int = 4) -> pltriton.CompilerParams:
  """Compiler parameters that select Pallas' Triton lowering on the GPU (JAX's default there is
  Mosaic GPU, for which these kernels are not written)."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def pow2(n: int, least: int) -> int:
  """The smallest power of two >= max(n, least): Triton loads and stores power-of-two shapes."""
  return max(least, 1 << (n - 1).bit_length())


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """a @ b contracting axis contract[0] of a with contract[1] of b, accumulated in float32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


def interpret() -> bool:
  """Whether pallas_call must interpret the kernels: everywhere but the GPU."""
  return jax.default_backend() != 'gpu'
