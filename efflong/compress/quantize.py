"""Post-training quantization with qwix: int8, w8a8, int4, bf16 and mixed precision per layer.

  model = ptq(float_model, 'int8', sample_batch)          # an nnx model, stored and run quantized
  model = ptq(float_model, 'mixed', sample_batch, rules=[('embedder/(embed|head)', 'bf16'),
                                                         ('.*', 'int8')])
  rows = sensitivity(float_model, 'int4', eval_fn, sample_batch)   # [(layer path, loss change)]

Methods (METHODS):
  bf16   every parameter stored in bfloat16, computed in the model's dtype (a cast: no qwix).
  int8   the matmul layers' kernels (efflong.models.MATMULS: q, k, v, o, wi, wo, the output head)
         in int8 with an absmax scale per output channel, weight-only (qwix.PtqProvider).
  w8a8   int8 as above, and those layers' inputs quantized to int8 on the fly, one scale per
         token; attention's activation x activation products stay float
         (efflong.models.quantization_rules).
  int4   the kernels in int4 (jnp.int4), absmax per output channel and per tile of
         models.INT4_TILE inputs where it divides the kernel's, weight-only.
  mixed  a precision per layer from rules: (path regex, precision) pairs, first match wins,
         regexes matched whole against the layer paths qwix uses ('stack/layers/0/ff/wi',
         'embedder/embed'); a layer no rule names stays float32. Default MIXED_DEFAULT:
         the embedding and the output head in bf16, every other kernel int8.
Precisions of a layer (PRECISIONS): fp32, bf16 (any layer with parameters), int8, w8a8, int4 (matmul
layers only: qwix quantizes matmul operands; the embedding lookup is a gather). Norms, biases and
an attention family's own parameters stay float32 except under bf16.

qwix quantizes one method of an NNX model, `__call__`; the models decode through it (prefill and
decode_step call `model(batch, cache=cache)`), so efflong.infer.decode.generate runs quantized.
A quantized model is saved like any other (efflong.compress.cli.save: its params hold the qvalue
and scale arrays) and loaded by efflong.infer.generate.load_model, which rebuilds it quantized
from the run's config (its `compress` section names the method and rules).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix
from flax import nnx

from efflong import errors, models

METHODS = ('bf16', 'int8', 'w8a8', 'int4', 'mixed')
PRECISIONS = ('fp32', 'bf16', *models.QUANTIZED)
MIXED_DEFAULT = (('embedder/(embed|head)', 'bf16'), ('.*', 'int8'))
# Layers a float precision (fp32, bf16) may name; the quantized ones apply to models.MATMULS only.
FLOAT_LAYERS = (*models.MATMULS, nnx.Embed)

Rules = Sequence[tuple[str, str] | str]  # (regex, precision) pairs or 'regex=precision' strings
Batch = dict[str, Any]


def _parse_rules(rules: Rules) -> list[tuple[str, str]]:
  """(regex, precision) pairs from pairs or 'regex=precision' strings (the command's --rules)."""
  pairs = []
  for rule in rules:
    if isinstance(rule, str):
      regex, sep, precision = rule.rpartition('=')
      if not sep:
        raise errors.Error(f"quantization rule {rule!r} is not 'regex=precision'.")
      rule = (regex, precision)
    regex, precision = rule
    if precision not in PRECISIONS:
      raise errors.Error(f'rule {regex!r}: unknown precision {precision!r}; valid: '
                         f'{list(PRECISIONS)}.')
    try:
      re.compile(regex)
    except re.error as e:
      raise errors.Error(f'rule {regex!r}: not a regular expression ({e}).') from None
    pairs.append((regex, precision))
  return pairs


def assign(model: nnx.Module, rules: Rules) -> dict[str, str]:
  """{layer path: precision} by rules, first match wins (re.fullmatch on the path).

  A quantized precision (int8, w8a8, int4) names matmul layers only, fp32 and bf16 also the
  embedding; layers no rule names are left out (they stay as they are).

  Raises:
    errors.Error: a malformed rule, an unknown precision, or a rule that matches no layer it
      may name (or only layers an earlier rule took): one line listing the model's layer paths.
  """
  matmuls, floats = models.layer_paths(model), models.layer_paths(model, FLOAT_LAYERS)
  out: dict[str, str] = {}
  for regex, precision in _parse_rules(rules):
    quantized = precision in models.QUANTIZED
    paths = [p for p in (matmuls if quantized else floats)
             if p not in out and re.fullmatch(regex, p)]
    if not paths:
      kind = 'matmul layer' if quantized else 'layer'
      raise errors.Error(f'rule {regex!r}={precision} matches no {kind} (not taken by an earlier '
                         f'rule); {precision} applies to: {matmuls if quantized else floats}.')
    out.update(dict.fromkeys(paths, precision))
  return out


def _cast(module: nnx.Module, dtype: Any) -> None:
  """Casts module's floating nnx.Params (all of its sub-modules') to dtype, in place."""
  state = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))


def _check_method(method: str, rules: Rules | None) -> Rules:
  """The method's rules (its own for int8 / w8a8 / int4, rules or MIXED_DEFAULT for mixed)."""
  if method not in METHODS:
    raise errors.Error(f'unknown quantization method {method!r}; valid: {list(METHODS)}.')
  if rules is not None and method != 'mixed':
    raise errors.Error(f'quantization rules apply to method mixed, not {method!r}.')
  if method == 'mixed':
    return MIXED_DEFAULT if rules is None else rules
  return (('.*', method),)


def ptq(model: nnx.Module, method: str, sample_batch: Batch, *,
        rules: Rules | None = None) -> nnx.Module:
  """A copy of model quantized after training by method (METHODS; see the module docstring).

  The quantized kernels are stored as qwix QArrays (qvalue int8 / int4 with a float32 scale per
  output channel) and the forward pass (and decoding, through __call__) multiplies with them.
  The quantized model is traced abstractly (nnx.eval_shape: qwix learns each kernel's layout from
  one call on sample_batch) and model's parameters quantized into it (qwix.quantize_params).

  Args:
    model: a float model (efflong.models.build, or a trained run's parameters).
    method: a name in METHODS.
    sample_batch: a batch the model can be called on (e.g. `sample_batch(config)`); its values do
      not matter.
    rules: mixed only: (path regex, precision) pairs or 'regex=precision' strings.
  Returns:
    the quantized model (model itself is unchanged).
  Raises:
    errors.Error: an unknown method, rules given to another method, or a bad rule (`assign`).
  """
  rules = _check_method(method, rules)
  if method == 'bf16':
    out = nnx.clone(model)
    _cast(out, jnp.bfloat16)
    return out
  precisions = assign(model, rules)
  quantized = {p: q for p, q in precisions.items() if q in models.QUANTIZED}
  provider = qwix.PtqProvider(models.quantization_rules(model, quantized))
  out = nnx.eval_shape(lambda m: qwix.quantize_model(m, provider, sample_batch), model)
  # jnp.asarray: a checkpoint restored without shardings holds numpy arrays, which qwix refuses.
  values = jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(model)))
  nnx.update(out, qwix.quantize_params(values, out))
  modules = models.layers(out, (nnx.Module,))
  for path, precision in precisions.items():
    if precision == 'bf16':
      _cast(modules[path], jnp.bfloat16)
  return out


def _bits(dtype: Any) -> int:
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.finfo(dtype).bits
  return 8 * dtype.itemsize


def param_bytes(model_or_state: nnx.Module | Any) -> int:
  """Bytes of the stored parameters at their dtype's bit width: a quantized kernel counts its
  values (int8: 1 byte, int4: 1/2 byte, rounded up per array, as packed storage holds it; jax on
  the CPU keeps one int4 per byte in memory) plus its float32 scales.

  Args:
    model_or_state: a model (its nnx.Params are counted), or a state / pytree of arrays or
      jax.ShapeDtypeStructs (every leaf is counted).
  """
  state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return sum(math.ceil(x.size * _bits(x.dtype) / 8) for x in jax.tree.leaves(state))


def sensitivity(model: nnx.Module, method: str, eval_fn: Callable[[nnx.Module], float],
                sample_batch: Batch) -> list[tuple[str, float]]:
  """The eval loss change from quantizing one layer at a time (the others float), largest first.

  Args:
    model: the float model.
    method: the precision tried per layer: bf16 (every layer with parameters), int8, w8a8, int4
      (the matmul layers).
    eval_fn: model -> its eval loss (a float).
    sample_batch: as for ptq.
  Returns:
    [(layer path, eval_fn(model with that layer quantized) - eval_fn(model))], sorted by the
    change, largest first.
  """
  if method not in PRECISIONS or method == 'fp32':
    raise errors.Error(f'sensitivity quantizes one layer at a time: method {method!r} must be one '
                       f'of {list(PRECISIONS[1:])}.')
  types = models.MATMULS if method in models.QUANTIZED else FLOAT_LAYERS
  base = eval_fn(model)
  rows = [(path, eval_fn(ptq(model, 'mixed', sample_batch, rules=[(re.escape(path), method)]))
           - base) for path in models.layer_paths(model, types)]
  return sorted(rows, key=lambda row: -row[1])


def sample_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A zero batch of config's model kind (what ptq traces the model on): [1, seq_len] int32
  inputs ('inputs1', 'inputs2' for a dual encoder; 'decoder_inputs' too for an
  encoder-decoder)."""
  zeros = np.zeros((1, config.task.seq_len), np.int32)
  kind = config.model.kind
  if kind == 'dual_encoder':
    return {'inputs1': zeros, 'inputs2': zeros}
  if kind == 'encoder_decoder':
    return {'inputs': zeros, 'decoder_inputs': zeros}
  return {'inputs': zeros}


