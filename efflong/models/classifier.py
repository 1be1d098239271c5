"""Sequence classifiers for the Long Range Arena (Tay et al. 2021): a classifier that pools per
packed example, and a dual encoder for document matching (LRA's Retrieval).

Rows may be packed: batch['segment_ids'] [B, T] holds 1, 2, ..., n (n <= max_segments = S, one id
per example, in order, each example's tokens contiguous) and then 0 on padding; batch['positions']
restart at 0 in each example. Every output is per example slot: [B, S, C] logits, slot s - 1 for
segment s. An unpacked row is the S = 1 case (one example, then padding); slots of a row with fewer
than S examples hold finite logits that mean nothing, and the loss weighs them 0 (the task's
`label_weights` [B, S]; efflong/tasks/lra). Without segment_ids a row is one example, no padding.

Pooling (`model.pooling`), over each example's own tokens only:
  mean   the mean of the encoder's outputs over the example's tokens (LRA's MEAN averaged over the
         whole row, pads included; here pads never count, so padding cannot change a logit).
  first  the output at the example's first token.
  cls    LRA's CLS: a learned vector is put before each example and its output is the pooled
         vector. In the row the encoder sees, example s is [CLS_s, its tokens], so the row grows
         from T to T + S: a row with n < S examples gets its S - n unused CLS vectors as padding
         (segment id 0) after its last example. CLS_s takes segment id s and position 0, and the
         example's tokens positions + 1 (LRA's layout: the CLS at 0, tokens from 1; the position
         table holds seq_len + 1 rows); it is not a global token.

Heads (LRA's code, lra_benchmarks/models/layers/common_layers.py): Dense(m), ReLU, Dense(C) on the
pooled vector with m = model.classifier_mlp_dim (0: one Dense(C)); the dual encoder reads
[u, v, u * v, u - v] (the paper's Retrieval setup, section 2.2) through Dense(m), ReLU, Dense(m / 2),
ReLU, Dense(C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from efflong import errors
from efflong.models.transformer import Embedder
from efflong.nn.blocks import Stack
from efflong.nn.layers import dense
from efflong.params import Dtype, partitioned

Batch = dict[str, jax.Array]
POOLINGS = ('mean', 'first', 'cls')


def check_segments(segment_ids: jax.Array, max_segments: int) -> None:
  """errors.CheckError (also under jit) unless every row of segment_ids [B, T] is 1..n in order,
  n <= max_segments, each id's tokens contiguous, padding (0) after the last example."""
  prev = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]  # the id before each token (0 at t = 0)
  step = segment_ids - prev
  real = segment_ids > 0
  after_pad = real & (prev == 0) & ((jnp.arange(segment_ids.shape[1]) > 0) | (segment_ids != 1))
  jump = real & (prev > 0) & ((step < 0) | (step > 1))
  rows = jnp.any(after_pad | jump | (segment_ids < 0), axis=1)
  first_bad, count = jnp.argmax(rows), jnp.sum(rows)

  def message(count, first_bad, high):
    if count:
      return (f'segment_ids of row {int(first_bad)} do not run 1, 2, ..., n in order with padding '
              f'(0) after them ({int(count)} such rows); packed rows must be laid out so.')
    if high > max_segments:
      return (f'segment id {int(high)} exceeds model max_segments={max_segments} '
              '(task.max_segments): its example would be pooled nowhere.')
    return None

  high = jnp.max(segment_ids)
  errors.check(message, count, first_bad, high, failed=(count > 0) | (high > max_segments))


def segment_starts(segment_ids: jax.Array, max_segments: int) -> jax.Array:
  """[B, T] segment ids (laid out as `check_segments` asks) -> [B, S] int32: the index of each
  segment's first token; for a segment the row lacks, the number of real tokens in the row."""
  ids = jnp.arange(1, max_segments + 1)
  real = segment_ids[:, :, None] > 0
  before = real & (segment_ids[:, :, None] < ids)                       # [B, T, S]
  return jnp.sum(before, axis=1, dtype=jnp.int32)


def insert_cls(x: jax.Array, cls: jax.Array, segment_ids: jax.Array,
               max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Puts cls before each example of the rows x (see the module docstring).

  Args:
    x: [B, T, D] embedded tokens.
    cls: [D] the embedded CLS vector (with position 0).
    segment_ids: [B, T] (1..n, then 0).
    max_segments: S.
  Returns:
    (x' [B, T + S, D], segment ids [B, T + S], the index of each CLS in x' [B, S]).
  """
  b, t, _ = x.shape
  s = max_segments
  ids = jnp.arange(1, s + 1)
  # Token p of segment k moves to p + k (k CLS vectors before it); a pad to p + S.
  token_dest = jnp.arange(t) + jnp.where(segment_ids > 0, segment_ids, s)           # [B, T]
  cls_dest = segment_starts(segment_ids, s) + ids - 1                                 # [B, S]
  present = jnp.any(segment_ids[:, :, None] == ids, axis=1)                           # [B, S]
  rows = jnp.arange(b)[:, None]
  out = jnp.zeros((b, t + s, x.shape[-1]), x.dtype)
  out = out.at[rows, token_dest].set(x).at[rows, cls_dest].set(cls.astype(x.dtype))
  seg = jnp.zeros((b, t + s), segment_ids.dtype)
  seg = seg.at[rows, token_dest].set(segment_ids).at[rows, cls_dest].set(
      jnp.where(present, ids, 0).astype(segment_ids.dtype))
  return out, seg, cls_dest


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, D], index [B, S] -> x[b, index[b, s]] [B, S, D] (indices clipped to T - 1)."""
  return jnp.take_along_axis(x, jnp.minimum(index, x.shape[1] - 1)[..., None], axis=1)


class Tower(nnx.Module):
  """Embedding, a bidirectional stack and per-example pooling (`pool`: tokens [B, T] ->
  [B, S, D]), and the head its subclass makes (`make_head`)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, vocab_size: int, max_len: int,
               num_classes: int, attention_kw: dict, rngs: nnx.Rngs, max_segments: int = 1,
               **unused_task):
    dtype = jnp.dtype(cfg.dtype)
    if cfg.pooling not in POOLINGS:
      raise errors.Error(f'unknown model.pooling {cfg.pooling!r}; valid: {list(POOLINGS)}.')
    if max_segments < 1:
      raise errors.Error(f'task.max_segments={max_segments} must be >= 1.')
    self.pooling, self.max_segments = cfg.pooling, max_segments
    cls = cfg.pooling == 'cls'
    # With CLS the positions run to seq_len (tokens from 1) and the stack sees T + S tokens.
    self.embedder = Embedder(cfg, vocab_size, max_len + cls, dtype=dtype, rngs=rngs, logits=False)
    self.encoder = Stack(cfg, causal=False, max_len=max_len + cls * max_segments,
                         attention_kw=attention_kw, dtype=dtype, rngs=rngs)
    self.cls = nnx.Param(partitioned(nnx.initializers.zeros, 'embed')(
        rngs.params(), (cfg.d_model,))) if cls else None
    self.head = self.make_head(cfg, num_classes, dtype=dtype, rngs=rngs)

  @staticmethod
  def make_head(cfg: ml_collections.ConfigDict, num_classes: int, *, dtype: Dtype,
                rngs: nnx.Rngs) -> nnx.Module:
    """The subclass's head over the pooled features."""
    raise NotImplementedError

  def pool(self, tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
           *, key: jax.Array | None, global_tokens: jax.Array | None = None) -> jax.Array:
    """tokens, segment_ids, positions [B, T] -> pooled [B, S, D] (compute dtype)."""
    keys = [None, None] if key is None else list(jax.random.split(key))
    if segment_ids is None:
      if self.max_segments > 1:
        raise errors.Error(f'rows without segment_ids hold one example; model max_segments='
                           f'{self.max_segments} needs segment_ids.')
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    else:
      check_segments(segment_ids, self.max_segments)
    if positions is None:  # one example per row: 0..T-1
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if self.pooling == 'cls':
      if global_tokens is not None:
        raise errors.Error("model.pooling='cls' inserts tokens into the row; batch global_tokens "
                           'cannot follow them (use mean or first pooling).')
      x = self.embedder.encode(tokens, positions + 1, keys[0])
      cls = self.cls[...] + self.embedder.positions(jnp.zeros((1, 1), jnp.int32))  # position 0
      x, seg, cls_index = insert_cls(x, jnp.reshape(cls, (-1,)), segment_ids, self.max_segments)
      x = self.encoder(x, segment_ids=seg, key=keys[1])
      return _gather(x, cls_index)
    x = self.embedder.encode(tokens, positions, keys[0])
    x = self.encoder(x, segment_ids=segment_ids, key=keys[1], global_tokens=global_tokens)
    if self.pooling == 'first':
      return _gather(x, segment_starts(segment_ids, self.max_segments))
    member = segment_ids[:, :, None] == jnp.arange(1, self.max_segments + 1)            # [B, T, S]
    member = member.astype(x.dtype)
    total = jnp.einsum('BTD,BTS->BSD', x, member)
    return total / jnp.maximum(member.sum(1), 1.0)[..., None]


class MLPHead(nnx.Module):
  """Dense layers with ReLU between them: [..., d_in] -> [..., hidden..., num_classes] float32."""

  def __init__(self, d_in: int, hidden: tuple[int, ...], num_classes: int, *, dtype: Dtype,
               rngs: nnx.Rngs):
    if num_classes < 1:
      raise errors.Error(f'task.num_classes={num_classes} must be >= 1 for a classifier.')
    sizes = (d_in, *hidden, num_classes)
    # Logical axes alternate (embed, mlp), (mlp, embed), ... as in a feed-forward; the last layer's
    # output (the classes) is replicated.
    axes = lambda i: (('embed', 'mlp')[i % 2], None if i == len(hidden) else ('mlp', 'embed')[i % 2])
    self.layers = nnx.List([dense(a, b, axes(i), dtype=dtype, rngs=rngs)
                            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x) if i == 0 else layer(jax.nn.relu(x))
    return x.astype(jnp.float32)


class Classifier(Tower):
  """kind 'classifier': Tower + MLPHead; batch inputs, segment_ids?, positions?, global_tokens?
  -> [B, S, num_classes] float32 logits, S = max_segments (module docstring)."""

  @staticmethod
  def make_head(cfg: ml_collections.ConfigDict, num_classes: int, *, dtype: Dtype,
                rngs: nnx.Rngs) -> nnx.Module:
    mlp = cfg.classifier_mlp_dim
    return MLPHead(cfg.d_model, (mlp,) if mlp else (), num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, batch: Batch, *, key: jax.Array | None = None) -> jax.Array:
    pooled = self.pool(batch['inputs'], batch.get('segment_ids'), batch.get('positions'), key=key,
                        global_tokens=batch.get('global_tokens'))
    return self.head(pooled)


def pair_features(u: jax.Array, v: jax.Array) -> jax.Array:
  """[..., D] twice -> [..., 4D]: [u, v, u * v, u - v] (LRA section 2.2, Retrieval)."""
  return jnp.concatenate([u, v, u * v, u - v], axis=-1)


class DualEncoder(Tower):
  """kind 'dual_encoder': one tower reads both documents (shared weights, one pass over the 2B
  rows); the head reads pair_features of the pooled u, v. Batch inputs1, segment_ids1?,
  positions1?, inputs2, segment_ids2?, positions2? ([B, T] each) -> [B, S, num_classes]."""

  @staticmethod
  def make_head(cfg: ml_collections.ConfigDict, num_classes: int, *, dtype: Dtype,
                rngs: nnx.Rngs) -> nnx.Module:
    mlp = cfg.classifier_mlp_dim
    return MLPHead(4 * cfg.d_model, (mlp, mlp // 2) if mlp else (), num_classes, dtype=dtype,
                   rngs=rngs)

  def features(self, batch: Batch, *, key: jax.Array | None = None) -> jax.Array:
    """[B, S, 4D]: pair_features of the pooled documents."""
    if batch['inputs1'].shape != batch['inputs2'].shape:
      raise errors.Error(f'inputs1 {batch["inputs1"].shape} and inputs2 {batch["inputs2"].shape} '
                         'must have one shape (both padded to task.seq_len).')
    both = lambda name: (None if batch.get(f'{name}1') is None else
                         jnp.concatenate([batch[f'{name}1'], batch[f'{name}2']]))
    for name in ('segment_ids', 'positions'):
      if (batch.get(f'{name}1') is None) != (batch.get(f'{name}2') is None):
        raise errors.Error(f'dual_encoder needs both {name}1 and {name}2, or neither.')
    pooled = self.pool(both('inputs'), both('segment_ids'), both('positions'), key=key)
    u, v = jnp.split(pooled, 2)
    return pair_features(u, v)

  def __call__(self, batch: Batch, *, key: jax.Array | None = None) -> jax.Array:
    return self.head(self.features(batch, key=key))


__all__ = ['Classifier', 'DualEncoder', 'MLPHead', 'POOLINGS', 'Tower', 'check_segments',
           'insert_cls', 'pair_features', 'segment_starts']
