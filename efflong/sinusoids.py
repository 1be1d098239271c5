"""Sinusoidal encodings of positions: sines and cosines of the position at geometric frequencies.

The idea is Vaswani et al. 2017, section 3.5. Two layouts of it are in use:

- `sinusoidal`, what `model.positions='sinusoidal'` and Transformer-XL's distance encoding
  (efflong.attention.relative) use, is tensor2tensor's timing signal (`get_timing_signal_1d` in
  tensor2tensor/layers/common_attention.py; also the Flax examples' `sinusoidal_init`): the D/2
  sines first, then the D/2 cosines, at frequencies max_timescale^(-i / (D/2 - 1)),
  i = 0 .. D/2 - 1, which run from 1 down to exactly 1 / max_timescale; an odd D gets a zero last
  dimension.
- `sinusoidal_paper`, `model.positions='sinusoidal_paper'`, is the paper's formula:
  PE(p, 2i) = sin(p / 10000^(2i / D)) and PE(p, 2i + 1) = cos(p / 10000^(2i / D)), sine and cosine
  interleaved on even and odd dimensions, the slowest frequency just above 1 / 10000.

So the two differ in the order of the dimensions and, slightly, in the frequencies (exponent
i / (D/2 - 1) against i / (D/2)); tensor2tensor notes the difference itself (its pull request 177).

A leaf: it imports nothing of efflong, so that efflong.attention and efflong.nn both use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sinusoidal(positions: jax.Array, dim: int, max_timescale: float = 1e4) -> jax.Array:
  """tensor2tensor's timing signal: [...] integer positions -> [..., dim] float32 encodings.

  Sin on the first half of the dimensions and cos on the second, at frequencies geometric from 1
  to 1 / max_timescale over the half - 1 steps between them; an odd dim's last entry is 0.
  """
  half = dim // 2
  inv_freq = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, dim - 2 * half)])


def sinusoidal_paper(positions: jax.Array, dim: int, max_timescale: float = 1e4) -> jax.Array:
  """Vaswani et al. 2017's formula: [...] integer positions -> [..., dim] float32 encodings.

  Dimensions 2i and 2i + 1 are sin and cos of position / max_timescale^(2i / dim); with an odd dim
  the last one is a sine.
  """
  pair = jnp.arange(dim) // 2
  inv_freq = max_timescale ** (-2.0 * pair.astype(jnp.float32) / dim)
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  return jnp.where(jnp.arange(dim) % 2 == 0, jnp.sin(angles), jnp.cos(angles))
