"""Reversible residual layers (Gomez et al. 2017; Reformer section 3) over a stack of Blocks.

Two streams: Y1 = X1 + F(X2), Y2 = X2 + G(Y1), with F the attention sub-layers and G the
feed-forward of a pre-LN Block. The whole stack is one custom_vjp whose residuals are its outputs
only: the backward pass recomputes each layer's inputs from its outputs, X2 = Y2 - G(Y1),
X1 = Y1 - F(X2), so activation memory does not grow with depth. Dropout keys and family state (LSH
hash keys, random features) are explicit inputs, so the recomputation replays them exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def layer_fns(graphdef: nnx.GraphDef, num_layers: int):
  """(F_i, G_i) for each layer i, both (params, rest, x, context, aux) -> [B, T, D]; G ignores
  context. aux = (segment_ids, global_tokens, context_segment_ids, key)."""

  def branch(i, which):
    def fn(params, rest, x, context, aux):
      segment_ids, global_tokens, context_segment_ids, key = aux
      layer = nnx.merge(graphdef, params, rest).layers[i]
      layer_key = None if key is None else jax.random.fold_in(key, i)
      if which == 'f':
        return layer.attention_delta(x, key=layer_key, segment_ids=segment_ids,
                                     global_tokens=global_tokens, context=context,
                                     context_segment_ids=context_segment_ids)
      return layer.ff_delta(x, key=layer_key)
    return fn

  return [(branch(i, 'f'), branch(i, 'g')) for i in range(num_layers)]


def forward(fns: Sequence, params: Any, rest: Any, x1: jax.Array, x2: jax.Array,
            context: jax.Array | None, aux: tuple) -> tuple[jax.Array, jax.Array]:
  """The two-stream recurrence, differentiable by plain autodiff (the reference)."""
  for f, g in fns:
    x1 = x1 + f(params, rest, x2, context, aux)
    x2 = x2 + g(params, rest, x1, context, aux)
  return x1, x2


def _add(a, b):
  return a if b is None else jax.tree.map(jnp.add, a, b)


def make(graphdef: nnx.GraphDef, num_layers: int):
  """The stack's reversible function (params, rest, x1, x2, context, aux) -> (y1, y2)."""
  fns = layer_fns(graphdef, num_layers)

  @jax.custom_vjp
  def run(params, rest, x1, x2, context, aux):
    return forward(fns, params, rest, x1, x2, context, aux)

  def run_fwd(params, rest, x1, x2, context, aux):
    y1, y2 = forward(fns, params, rest, x1, x2, context, aux)
    return (y1, y2), (params, rest, y1, y2, context, aux)

  def run_bwd(res, grads):
    params, rest, y1, y2, context, aux = res

    def layer_bwd(i, carry):
      """Layer i backward: (Y1, Y2, dY1, dY2, ...) -> (X1, X2, dX1, dX2, ...)."""
      f, g = fns[i]
      y1, y2, g1, g2, d_params, d_context = carry
      # Y2 = X2 + G(Y1): recover X2, send dY2 through G into Y1 and the parameters.
      g_out, g_vjp = jax.vjp(lambda p, h: g(p, rest, h, context, aux), params, y1)
      x2 = y2 - g_out
      dp, dh = g_vjp(g2)
      g1, d_params = g1 + dh, _add(d_params, dp)
      # Y1 = X1 + F(X2): recover X1, send dY1 through F into X2, the parameters and the context.
      f_out, f_vjp = jax.vjp(lambda p, h, c: f(p, rest, h, c, aux), params, x2, context)
      dp, dh, dc = f_vjp(g1)  # dc is None without a context.
      x1 = y1 - f_out
      return x1, x2, g1, g2 + dh, _add(d_params, dp), _add(d_context, dc)

    # A scan over the layers (a switch picks layer i's code) rather than an unrolled loop: the
    # recomputation chain X_i <- Y_i does not depend on the gradients, and XLA otherwise schedules
    # all of it first and keeps every layer's activations alive (memory linear in depth again).
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    carry = (y1, y2, *grads, zeros(params), zeros(context))
    branches = [functools.partial(layer_bwd, i) for i in range(num_layers)]
    carry, _ = jax.lax.scan(lambda c, i: (jax.lax.switch(i, branches, c), None), carry,
                            jnp.arange(num_layers - 1, -1, -1))
    _, _, g1, g2, d_params, d_context = carry
    return d_params, None, g1, g2, d_context, None

  run.defvjp(run_fwd, run_bwd)
  return run
