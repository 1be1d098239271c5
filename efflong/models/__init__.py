"""Model kinds by config name (`config.model.kind`)."""

from __future__ import annotations

import ml_collections
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


def build(config: ml_collections.ConfigDict, *, attention_kw: dict | None = None,
          rngs: nnx.Rngs) -> nnx.Module:
  """The model named by config.model.kind, sized for config.task.

  Args:
    config: the full experiment config (model and task sections are read).
    attention_kw: overrides config.model.attention_kw (an eval-time setting); None keeps it.
    rngs: parameter initialisation rngs.

  The classifiers (efflong.models.classifier) return one logit vector per example slot:
  task.max_segments (default 1) slots per row.
  """
  kind = config.model.kind
  if kind not in KINDS:
    raise errors.Error(f'unknown model.kind {kind!r}; valid: {sorted(KINDS)}.')
  if not 0.0 <= config.model.dropout_rate < 1.0:
    raise errors.Error(f'model.dropout_rate={config.model.dropout_rate} must be in [0, 1).')
  if attention_kw is None:
    attention_kw = config.model.attention_kw.to_dict()
  return KINDS[kind](config.model, vocab_size=config.task.vocab_size,
                     max_len=config.task.seq_len, num_classes=config.task.get('num_classes', 0),
                     max_segments=config.task.get('max_segments', 1), attention_kw=attention_kw,
                     rngs=rngs)

__all__ = ['KINDS', 'build', 'init_memory']
