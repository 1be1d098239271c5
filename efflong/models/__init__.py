"""Model kinds by config name (`config.model.kind`)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx

from efflong import errors
from efflong.models.classifier import Classifier, DualEncoder
from efflong.models.transformer import Encoder, EncoderDecoder, LanguageModel, init_memory

KINDS = {
    'lm': LanguageModel,
    'encoder': Encoder,
    'encoder_decoder': EncoderDecoder,
    'classifier': Classifier,
    'dual_encoder': DualEncoder,
}


# The quantized precisions of a matmul layer, as qwix rule fields: int8 and int4 weights with one
# absmax scale per output channel (qwix scales every non-contracting axis of a weight), weight-only;
# w8a8 adds int8 activations with a dynamic scale per token (every non-contracting axis of the
# input). int4 also has one scale per INT4_TILE inputs (`quantization_rules`). Quantization-aware
# training (`quantization_aware`) and post-training quantization (efflong.compress.quantize, which
# this package may not import: the package layering) share them.
QUANTIZED = {
    'int8': dict(weight_qtype=jnp.int8),
    'w8a8': dict(weight_qtype=jnp.int8, act_qtype=jnp.int8),
    'int4': dict(weight_qtype=jnp.int4),
}
# Measured on runs/compress/fp32 (bytes_lm, d_model 128, eval 8 batches): int4 per channel 2.565
# bits/byte, with tiles of 32 inputs 2.553 (fp32 2.531), for 11% more parameter bytes.
INT4_TILE = 32
MATMULS = (nnx.Linear, nnx.Einsum)  # layers whose kernel is a matmul operand
QAT_METHODS = ('none', *QUANTIZED)


def layers(model: nnx.Module, types: tuple[type, ...] = MATMULS) -> dict[str, nnx.Module]:
  """{path: module} of model's modules of these types, paths '/'-joined as qwix matches them."""
  return {'/'.join(map(str, path)): module for path, module in nnx.iter_modules(model)
          if isinstance(module, types)}


def layer_paths(model: nnx.Module, types: tuple[type, ...] = MATMULS) -> list[str]:
  """The paths of model's layers of these types, '/'-joined as qwix matches them
  (e.g. 'stack/layers/0/ff/wi'), in model order."""
  return list(layers(model, types))


def _last_contraction(layer: nnx.Module) -> int:
  """The size of the kernel's last contracted axis, which qwix tiles (a Linear's input axis; an
  Einsum's last kernel axis named in its input and not its output)."""
  shape = layer.kernel.shape
  if isinstance(layer, nnx.Linear):
    return shape[0]
  inputs, out = layer.einsum_str.replace(' ', '').split('->')
  x, w = inputs.split(',')
  return [n for c, n in zip(w, shape) if c in x and c not in out][-1]


def quantization_rules(model: nnx.Module, precisions: dict[str, str],
                       rule: type[qwix.QuantizationRule] = qwix.QuantizationRule) -> list:
  """One qwix rule per layer of model: its exact path, the fields of its precision (precisions:
  {path of a MATMULS layer: a QUANTIZED key}) and for int4 tiles of INT4_TILE inputs where
  INT4_TILE divides the kernel's last contracted axis and is smaller (else per channel only).

  A rule matches the matmuls run by that module only. The attention layer's activation x
  activation products (q k^T, p v) run in the attention module itself, whose path no rule names,
  so they stay float whatever the precision (w8a8 included).
  """
  found = layers(model, MATMULS)
  rules = []
  for path, precision in precisions.items():
    size = _last_contraction(found[path])
    tiled = precision == 'int4' and size > INT4_TILE and size % INT4_TILE == 0
    rules.append(rule(module_path=re.escape(path), tile_size=INT4_TILE if tiled else None,
                      **QUANTIZED[precision]))
  return rules


def quantization_aware(model: nnx.Module, method: str) -> nnx.Module:
  """model with fake quantization of every matmul layer (qwix.QtProvider, straight-through
  gradients): the forward pass rounds the kernels (and, for w8a8, the layers' inputs) to the
  method's grid, the parameters stay float. Its parameters are the same tree as model's.

  Raises:
    errors.Error: an unknown method.
  """
  if method not in QUANTIZED:
    raise errors.Error(f'unknown qat.method {method!r}; valid: {list(QAT_METHODS)}.')
  provider = qwix.QtProvider(quantization_rules(
      model, dict.fromkeys(layer_paths(model), method), qwix.QtRule))
  # Weight-only and dynamic-range QAT create no variables, so the model needs no first call.
  return qwix.quantize_model(model, provider, skip_nnx_init=True)


def build(config: ml_collections.ConfigDict, *, attention_kw: dict | None = None,
          rngs: nnx.Rngs) -> nnx.Module:
  """The model named by config.model.kind, sized for config.task.

  Args:
    config: the full experiment config (model and task sections are read).
    attention_kw: overrides config.model.attention_kw (an eval-time setting); None keeps it.
    rngs: parameter initialisation rngs.

  The classifiers (efflong.models.classifier) return one logit vector per example slot:
  task.max_segments (default 1) slots per row. With config.qat.method other than 'none' the
  model trains with fake quantization (`quantization_aware`).
  """
  kind = config.model.kind
  if kind not in KINDS:
    raise errors.Error(f'unknown model.kind {kind!r}; valid: {sorted(KINDS)}.')
  if not 0.0 <= config.model.dropout_rate < 1.0:
    raise errors.Error(f'model.dropout_rate={config.model.dropout_rate} must be in [0, 1).')
  if attention_kw is None:
    attention_kw = config.model.attention_kw.to_dict()
  model = KINDS[kind](config.model, vocab_size=config.task.vocab_size,
                      max_len=config.task.seq_len, num_classes=config.task.get('num_classes', 0),
                      max_segments=config.task.get('max_segments', 1), attention_kw=attention_kw,
                      rngs=rngs)
  return model if config.qat.method == 'none' else quantization_aware(model, config.qat.method)

__all__ = ['INT4_TILE', 'KINDS', 'MATMULS', 'QAT_METHODS', 'QUANTIZED', 'build', 'init_memory',
           'layer_paths', 'layers', 'quantization_aware', 'quantization_rules']
