"""BigBird attention (Zaheer et al. 2020, Sec. 2 and App. D, the ITC variant).

Keys and queries are tiled in blocks of C. Query block q sees key blocks q - w .. q + w (causal:
q - w .. q, then causal within), r random key blocks outside that window (causal: earlier ones),
drawn per layer, head and query block (as the paper does) from numpy's generator seeded by
(`seed`, layer index), and the global tokens, which see everything and are seen by everything (as
in `longformer`; G = `global_tokens` slots). The pattern is fixed for a run; the family's module
(`LayerIndex`) tells attend its layer's index in the stack.

The explicit pattern: i sees j when |i // C - j // C| <= w, or j // C is one of the random blocks of
(head, i // C), or i or j is global. O(T * (2w + 1 + r) * C + T * G).

The random blocks depend on T: one generator serves the heads in turn, so how many draws head 0
takes (one per query block) moves the draws of every later head; only head 0's rows are the same
at every T. Decoding (attend_step, over dense.init_cache's full key/value cache) therefore draws the
layout at the cache length S_max: it equals the parallel form run at T = S_max (right-padded rows
included), not at a shorter T. A step reads its query block's row of that layout, (w + 1 + r) * C
keys per head, plus the G global keys; decoding takes the first G positions as the global tokens
(see `longformer`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efflong import errors
from efflong.attention import blocksparse, dense, local, longformer
from efflong.attention.blocksparse import EMPTY, FULL, Layout
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


def _check(window: int, global_tokens: int, random_blocks: int, block: int, t: int,
           length: str = 'T') -> None:
  """Raises errors.Error on a hyper-parameter unusable for t positions (`length` names t)."""
  local.check_positive(window=window, block=block)
  if random_blocks < 0:
    raise errors.Error(f'random_blocks={random_blocks} must be >= 0.')
  if not isinstance(global_tokens, int) or not 0 <= global_tokens <= t:
    raise errors.Error(f'global_tokens={global_tokens!r} must be an int in [0, {length}={t}].')


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
  local.check_self(q, k, v, mask, 'bigbird', global_tokens=True)
  t, n, h = q.shape[1:]
  _check(window, global_tokens, random_blocks, block, t)
  layout = random_layout(t, heads=n, block=block, window=window, random_blocks=random_blocks,
                         causal=mask.causal, seed=seed, layer=layer)
  out = longformer.attend_with_globals(q, k, v, mask=mask, layout=layout,
                                       global_tokens=global_tokens, global_qkv=None,
                                       scale=h ** -0.5 if scale is None else scale, impl=impl)
  return out.astype(q.dtype)


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array], *,
                mask: Mask, window: int = 1, global_tokens: int = 0, random_blocks: int = 3,
                block: int = 64, seed: int = 0, layer: int = 0,
                scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal BigBird attention of T new positions over the cache and themselves.

  The layout is `random_layout` at T = S_max (the module docstring says why); a query at p >= G
  gathers the keys of its block's row (window and random blocks, non-global, up to p) and merges
  them with the global keys; a global token (p < G) sees every key up to p.

  Args:
    q: [B, T, N, H] queries of the new positions (absolute positions cache['length'] + i).
    k, v: [B, T, K, H] their keys and values; K divides N.
    cache: dense.init_cache's k, v [B, S_max, K, H] and length [B].
    mask: causal; q_segment_ids [B, T] marks real new positions (1) and right-padding (0); no
      global_tokens flags.
    window, global_tokens, random_blocks, block, seed, layer, scale: as in `attend`.
  Returns:
    out [B, T, N, H] (finite, arbitrary at padding) and the cache with the real positions added.
  """
  local.check_step(q, k, v, mask, 'bigbird', global_tokens=True)
  s, n = cache['k'].shape[1], q.shape[2]
  _check(window, global_tokens, random_blocks, block, s, 'max_len')
  scale = q.shape[3] ** -0.5 if scale is None else scale
  positions, real, length = dense.new_positions(cache, mask, q.shape[1])
  ck, cv = dense.write(cache['k'], positions, real, k), dense.write(cache['v'], positions, real, v)
  layout = random_layout(s, heads=n, block=block, window=window, random_blocks=random_blocks,
                         causal=True, seed=seed, layer=layer)
  row = jnp.minimum(positions // block, layout.kv_blocks.shape[1] - 1)      # [B, T]
  blocks = jnp.moveaxis(jnp.asarray(layout.kv_blocks)[:, row], 0, 2)        # [B, T, N, V]
  visit = jnp.moveaxis(jnp.asarray(layout.kind != EMPTY)[:, row], 0, 2)
  x = (blocks[..., None] * block + jnp.arange(block)).reshape(*blocks.shape[:3], -1)
  allowed = (jnp.repeat(visit, block, axis=-1) & (x <= positions[:, :, None, None]) & (x < s)
             & (x >= global_tokens))
  index = jnp.minimum(x, s - 1)
  part = blocksparse.attend_gathered(q, blocksparse.gather_positions(ck, index),
                                     blocksparse.gather_positions(cv, index), allowed, scale)
  out = part[0]
  if global_tokens:
    kg, vg = ck[:, :global_tokens], cv[:, :global_tokens]
    out = longformer.step_with_globals(q, part, kg, vg, (q, kg, vg), positions, scale)
  return out.astype(q.dtype), {'k': ck, 'v': cv, 'length': length}


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
