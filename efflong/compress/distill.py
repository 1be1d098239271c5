"""Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
Network", section 2): a student learns a trained teacher's output distribution softened by a
temperature T, beside its own task loss.

A training run distils when config.distill.teacher_workdir names a trained run: the trainer
(efflong.train.trainer) restores the teacher's latest parameters once, runs the teacher in the same
jit'd train step without gradient, and trains the student on `distillation_loss`. The student may
differ from the teacher in depth, width and attention family; their outputs must have one shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from efflong import errors


def check(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict) -> None:
  """Raises a one-line errors.Error for a distill section or a teacher the student cannot use.

  Args:
    config: the student's run config (its distill section: temperature > 0, alpha in [0, 1]).
    teacher_config: the teacher run's config: the same task.vocab_size as the student's, and no
      segment memory (model.mem_len 0: the teacher sees each batch alone).
  """
  d = config.distill
  if not d.temperature > 0:
    raise errors.Error(f'distill.temperature={d.temperature!r} must be > 0.')
  if not 0 <= d.alpha <= 1:
    raise errors.Error(f'distill.alpha={d.alpha!r} must be in [0, 1].')
  vocab, teacher_vocab = config.task.vocab_size, teacher_config.task.vocab_size
  if vocab != teacher_vocab:
    raise errors.Error(f'the teacher in distill.teacher_workdir={d.teacher_workdir!r} has '
                       f'task.vocab_size={teacher_vocab}; the student has {vocab}: they must '
                       'be equal.')
  if teacher_config.model.mem_len:
    raise errors.Error(f'the teacher in distill.teacher_workdir={d.teacher_workdir!r} has a '
                       f'segment memory (model.mem_len={teacher_config.model.mem_len}); a teacher '
                       'must have none (model.mem_len=0).')


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
            temperature: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the weighted positions.

  The T^2 keeps the soft targets' gradients, which scale as 1 / T^2, on the task loss's scale as
  T changes (Hinton et al. 2015, section 2). The KL is optax.losses.kl_divergence_with_log_targets
  on log_softmax of both (float32), exact where a probability underflows to 0.

  Args:
    student_logits: [B, P, V].
    teacher_logits: [B, P, V], the same shape (the caller stops its gradient).
    weights: [B, P], 0 where a position is not scored.
    temperature: T > 0.
  Returns:
    (the weighted mean, (the weighted sum, the sum of weights)): the loss, and the metric's sum
    and count.
  Raises:
    errors.Error: the two logits' shapes differ.
  """
  if student_logits.shape != teacher_logits.shape:
    raise errors.Error(f"the teacher's outputs have shape {teacher_logits.shape}; the student's "
                       f'{student_logits.shape}: distillation needs one shape [B, P, V].')
  log_soft = lambda logits: jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
  kl = optax.losses.kl_divergence_with_log_targets(log_soft(student_logits),
                                                   log_soft(teacher_logits))  # [B, P]
  weights = weights.astype(jnp.float32)
  total, count = temperature**2 * (kl * weights).sum(), weights.sum()
  return total / jnp.maximum(count, 1.0), (total, count)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, task_loss: jax.Array,
                      weights: jax.Array, *, temperature: float,
                      alpha: float) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
  """alpha * kd_loss + (1 - alpha) * task_loss: Hinton et al.'s weighted average of the soft and
  the hard objective (section 2).

  Args:
    student_logits, teacher_logits, weights, temperature: as kd_loss takes them.
    task_loss: the student's task loss (a scalar).
    alpha: the soft targets' weight, in [0, 1].
  Returns:
    (the loss, {'kd_loss': (sum, count)}).
  """
  kd, kd_sum_count = kd_loss(student_logits, teacher_logits, weights, temperature)
  return alpha * kd + (1 - alpha) * task_loss, {'kd_loss': kd_sum_count}
