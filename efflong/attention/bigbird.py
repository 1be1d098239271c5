"""BigBird attention (Zaheer et al. 2020, Sec. 2 and App. D, the ITC variant).

Keys and queries are tiled in blocks of C. Query block q sees key blocks q - w .. q + w (causal:
q - w .. q, then causal within), r random key blocks outside that window (causal: earlier ones),
drawn per head and per query block from numpy's generator seeded by `seed`, and the global tokens,
which see everything and are seen by everything (as in `longformer`; G = `global_tokens` slots).

The explicit pattern: i sees j when |i // C - j // C| <= w, or j // C is one of the random blocks of
(head, i // C), or i or j is global. O(T * (2w + 1 + r) * C + T * G).
"""

from __future__ import annotations

import jax
import numpy as np

from efflong.attention import blocksparse, local, longformer
from efflong.attention.blocksparse import FULL, Layout
from efflong.mask import Mask


def random_layout(t: int, *, heads: int, block: int, window: int, random_blocks: int,
                  causal: bool, seed: int) -> Layout:
  """Window blocks plus, per head and query block, `random_blocks` random other key blocks."""
  nb = blocksparse.num_blocks(t, block)
  rng = np.random.default_rng(seed)
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
           scale: float | None = None, impl: str = 'xla') -> jax.Array:
  """BigBird block-sparse attention.

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H]; K divides N.
    mask: causal flag, segment ids and optional per-example global token flags.
    window: w, key blocks on each side of the query block (the paper's 3-block window is w = 1).
    global_tokens: G global slots: the first G positions, or the first G the mask flags.
    random_blocks: r random key blocks per query block and head.
    block: C, the block size.
    seed: seed of the random blocks; the pattern is fixed for a given (T, seed).
    scale: logit scale; default H ** -0.5.
    impl: 'xla' or 'pallas' (efflong.kernels.flash_attention), see `blocksparse.attend_layout`.
  Returns:
    [B, T, N, H].
  """
  local.check_positive(window=window, block=block)
  if random_blocks < 0:
    raise ValueError(f'random_blocks={random_blocks} must be >= 0.')
  local.check_self(q, k, v, mask, 'bigbird', global_tokens=True)
  t, n, h = q.shape[1:]
  if not isinstance(global_tokens, int) or not 0 <= global_tokens <= t:
    raise ValueError(f'global_tokens={global_tokens!r} must be an int in [0, T={t}].')
  layout = random_layout(t, heads=n, block=block, window=window, random_blocks=random_blocks,
                         causal=mask.causal, seed=seed)
  out = longformer.attend_with_globals(q, k, v, mask=mask, layout=layout,
                                       global_tokens=global_tokens, global_qkv=None,
                                       scale=h ** -0.5 if scale is None else scale, impl=impl)
  return out.astype(q.dtype)
