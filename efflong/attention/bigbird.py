"""BigBird attention (Zaheer et al. 2020, Sec. 2 and App. D, the ITC variant).

Keys and queries are tiled in blocks of C. Query block q sees key blocks q - w .. q + w (causal:
q - w .. q, then causal within), r random key blocks outside that window (causal: earlier ones),
drawn per layer, head and query block (as the paper does) from numpy's generator seeded by
(`seed`, layer index), and the global tokens, which see everything and are seen by everything (as
in `longformer`; G = `global_tokens` slots). The pattern is fixed for a run; the family's module
(`LayerIndex`) tells attend its layer's index in the stack.

The explicit pattern: i sees j when |i // C - j // C| <= w, or j // C is one of the random blocks of
(head, i // C), or i or j is global. O(T * (2w + 1 + r) * C + T * G).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from efflong import errors
from efflong.attention import blocksparse, local, longformer
from efflong.attention.blocksparse import FULL, Layout
from efflong.mask import Mask


def random_layout(t: int, *, heads: int, block: int, window: int, random_blocks: int,
                  causal: bool, seed: int, layer: int = 0) -> Layout:
  """Window blocks plus, per head and query block, `random_blocks` random other key blocks, drawn
  from numpy's generator seeded by (seed, layer)."""
  nb = blocksparse.num_blocks(t, block)
  rng = np.random.default_rng((seed, layer))
  sets = []
  for _ in range(heads):
    head = []
    for q in range(nb):
      near = list(range(max(0, q - window), min(nb, q + window + 1) if not causal else q + 1))
      far = [kb for kb in range(nb) if kb not in near and (kb < q or not causal)]
      drawn = rng.choice(far, size=min(random_blocks, len(far)), replace=False) if far else []
      head.append([(kb, FULL) for kb in near] + [(int(kb), FULL) for kb in drawn])
    sets.append(head)
  return blocksparse.from_sets(sets, block)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask, window: int = 1,
           global_tokens: int = 0, random_blocks: int = 3, block: int = 64, seed: int = 0,
           layer: int = 0, scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """BigBird block-sparse attention.

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H]; K divides N.
    mask: causal flag, segment ids and optional per-example global token flags.
    window: w, key blocks on each side of the query block (the paper's 3-block window is w = 1).
    global_tokens: G global slots: the first G positions, or the first G the mask flags.
    random_blocks: r random key blocks per query block and head.
    block: C, the block size.
    seed: seed of the random blocks; the pattern is fixed for a given (T, seed, layer).
    layer: the layer's index in its stack (from `LayerIndex`): each layer draws its own blocks.
    scale: logit scale; default H ** -0.5.
    impl: 'xla' or 'pallas' (efflong.kernels.flash_attention), see `blocksparse.attend_layout`.
  Returns:
    [B, T, N, H].
  """
  local.check_positive(window=window, block=block)
  if random_blocks < 0:
    raise errors.Error(f'random_blocks={random_blocks} must be >= 0.')
  local.check_self(q, k, v, mask, 'bigbird', global_tokens=True)
  t, n, h = q.shape[1:]
  if not isinstance(global_tokens, int) or not 0 <= global_tokens <= t:
    raise errors.Error(f'global_tokens={global_tokens!r} must be an int in [0, T={t}].')
  layout = random_layout(t, heads=n, block=block, window=window, random_blocks=random_blocks,
                         causal=mask.causal, seed=seed, layer=layer)
  out = longformer.attend_with_globals(q, k, v, mask=mask, layout=layout,
                                       global_tokens=global_tokens, global_qkv=None,
                                       scale=h ** -0.5 if scale is None else scale, impl=impl)
  return out.astype(q.dtype)


class LayerIndex(nnx.Module):
  """The family module: the layer's index in its stack (static); x [B, T, D] -> {'layer': i}."""

  def __init__(self, index: int):
    self.index = index

  def __call__(self, x: jax.Array) -> dict[str, int]:
    del x
    return {'layer': self.index}


def layer_index(hyper: dict[str, Any], *, stack_modules: dict | None, **layer: Any) -> LayerIndex:
  """Numbers the bigbird layers of a stack in the order they are built (0 outside a stack)."""
  del hyper, layer
  if stack_modules is None:
    return LayerIndex(0)
  index = stack_modules.get('bigbird_layers', 0)
  stack_modules['bigbird_layers'] = index + 1
  return LayerIndex(index)
