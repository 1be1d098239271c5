"""Helpers shared by tests across packages."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def segments(kind: str | None, b: int, t: int, *,
             runs: Sequence[Sequence[int]] = ()) -> jax.Array | None:
  """Segment ids [B, T] int32 for a Mask (0 = padding), or None.

  Args:
    kind: None (no ids); 'pad': one segment, odd rows end in t // 3 pad tokens; 'packed': ids 1
      then 2 from t // 2, row 0 ends in 3 pad tokens; 'runs': row i holds consecutive runs of
      ids 1, 2, ... with the lengths runs[i], then padding.
    b: batch size B.
    t: length T.
    runs: per-row run lengths, for kind 'runs' only.
  """
  if (kind == 'runs') != bool(runs):
    raise ValueError(f'runs={runs!r} goes with kind="runs" and only with it; kind={kind!r}.')
  if kind is None:
    return None
  seg = np.ones((b, t), np.int32)
  if kind == 'pad':
    seg[1::2, t - t // 3:] = 0
  elif kind == 'packed':
    seg[:, t // 2:] = 2
    seg[0, t - 3:] = 0
  elif kind == 'runs':
    if len(runs) != b or any(sum(row) > t for row in runs):
      raise ValueError(f'runs={runs!r} must give {b} rows of lengths summing to at most {t}.')
    seg[:] = 0
    for row, lengths in zip(seg, runs):
      row[:sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
  else:
    raise ValueError(f'kind={kind!r}; valid: None, "pad", "packed", "runs".')
  return jnp.asarray(seg)
