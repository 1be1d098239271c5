"""The LRA classifiers: per-example pooling of packed rows equals the examples alone, CLS layout,
padding invariance, and the dual encoder's pair features. Models run eagerly (shared op caches)."""

import functools
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from efflong import config as config_lib
from efflong import errors, models
from efflong.models import classifier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T, V, C, S = 12, 32, 3, 3
ATOL, MOVED = 1e-5, 1e-3
LENGTHS = (4, 3, 2)  # three examples packed in one row of T = 12, then 3 pads


def make_config(kind: str, max_segments: int, **model) -> ml_collections.ConfigDict:
  c = config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config('smoke')
  with c.unlocked():
    c.task.seq_len, c.task.vocab_size, c.task.num_classes = T, V, C
    c.task.max_segments = max_segments
    c.model.kind = kind
    c.model.classifier_mlp_dim = 16
    c.model.update(model)
  return c


@functools.lru_cache(maxsize=None)
def build(kind: str = 'classifier', max_segments: int = S, **model) -> nnx.Module:
  return models.build(make_config(kind, max_segments, **model), rngs=nnx.Rngs(0))


def examples(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(1, V, n).astype(np.int32) for n in LENGTHS]


def packed_row(exs, pad_token: int = 0) -> dict:
  """One row holding exs in order (segment ids 1..n, positions restarting), then padding."""
  used = sum(map(len, exs))
  return {'inputs': np.concatenate([*exs, np.full(T - used, pad_token, np.int32)])[None],
          'segment_ids': np.concatenate([np.full(len(e), i + 1) for i, e in enumerate(exs)]
                                        + [np.zeros(T - used, int)])[None].astype(np.int32),
          'positions': np.concatenate([np.arange(len(e)) for e in exs]
                                      + [np.zeros(T - used, int)])[None].astype(np.int32)}


def stack(rows: list[dict]) -> dict:
  return {k: jnp.asarray(np.concatenate([r[k] for r in rows])) for k in rows[0]}


@pytest.mark.parametrize('pooling', classifier.POOLINGS)
def test_packed_rows_give_each_example_its_logits_alone(pooling):
  """Row 0 packs three examples; rows 1-3 hold each alone (padded, other pad tokens). Slot k of
  row 0 equals slot 0 of row k + 1, and the max_segments = 1 model (same parameters) agrees."""
  exs = examples()
  batch = stack([packed_row(exs)] + [packed_row([e], pad_token=7) for e in exs])
  out = np.asarray(build(pooling=pooling)(batch))
  assert out.shape == (4, S, C) and out.dtype == np.float32
  for k in range(S):
    np.testing.assert_allclose(out[0, k], out[k + 1, 0], atol=ATOL)
  assert np.abs(out[1, 0] - out[2, 0]).max() > MOVED  # the examples differ
  alone = {k: v[1:] for k, v in batch.items()}
  single = np.asarray(build(pooling=pooling, max_segments=1)(alone))
  assert single.shape == (3, 1, C)
  np.testing.assert_allclose(single[:, 0], out[1:, 0], atol=ATOL)


@pytest.mark.parametrize('pooling', classifier.POOLINGS)
def test_padding_and_other_examples_do_not_move_a_logit(pooling):
  """Changing the pads, or the third example, leaves the first two examples' logits alone; changing
  a token of the first moves its own (so the probe can fail)."""
  exs = examples()
  changed_third = [exs[0], exs[1], (exs[2] % (V - 1)) + 1]
  changed_first = [np.r_[exs[0][:-1], exs[0][-1] % (V - 1) + 1], exs[1], exs[2]]
  batch = stack([packed_row(exs), packed_row(exs, pad_token=5), packed_row(changed_third),
                 packed_row(changed_first)])
  out = np.asarray(build(pooling=pooling)(batch))
  np.testing.assert_allclose(out[1], out[0], atol=ATOL)
  np.testing.assert_allclose(out[2, :2], out[0, :2], atol=ATOL)
  assert np.abs(out[2, 2] - out[0, 2]).max() > MOVED
  assert np.abs(out[3, 0] - out[0, 0]).max() > MOVED
  np.testing.assert_allclose(out[3, 1:], out[0, 1:], atol=ATOL)


def test_insert_cls_matches_a_python_twin():
  """Each example becomes [CLS, its tokens]; unused CLS slots are padding after the last one."""
  seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
  b, t = seg.shape
  x = np.arange(b * t, dtype=np.float32).reshape(b, t, 1) + 1.0
  out, new_seg, index = classifier.insert_cls(jnp.asarray(x), jnp.full((1,), -1.0),
                                              jnp.asarray(seg), S)
  for r in range(b):
    want_x, want_seg, want_index = [], [], []
    for k in range(1, S + 1):
      if (seg[r] == k).any():
        want_index.append(len(want_x))
        want_x += [-1.0] + list(x[r, seg[r] == k, 0])
        want_seg += [k] * (1 + (seg[r] == k).sum())
    for _ in range(S - len(want_index)):  # unused CLS vectors, as padding
      want_index.append(len(want_x))
      want_x.append(-1.0)
      want_seg.append(0)
    want_x += list(x[r, seg[r] == 0, 0])
    want_seg += [0] * (seg[r] == 0).sum()
    np.testing.assert_array_equal(np.asarray(out)[r, :, 0], want_x)
    np.testing.assert_array_equal(np.asarray(new_seg)[r], want_seg)
    np.testing.assert_array_equal(np.asarray(index)[r], want_index)


def test_cls_pooling_reads_a_learned_vector_that_sees_the_whole_example():
  model = build(pooling='cls')
  assert model.cls[...].shape == (32,)
  exs = examples()
  first, last = [np.r_[exs[0][0] % (V - 1) + 1, exs[0][1:]]], [np.r_[exs[0][:-1], 1 + exs[0][-1] % (V - 1)]]
  out = np.asarray(model(stack([packed_row([exs[0]]), packed_row(first), packed_row(last)])))
  assert np.abs(out[1, 0] - out[0, 0]).max() > MOVED and np.abs(out[2, 0] - out[0, 0]).max() > MOVED
  mean = np.asarray(build(pooling='mean')(stack([packed_row([exs[0]])])))
  assert np.abs(mean[0, 0] - out[0, 0]).max() > MOVED


def test_dual_encoder_pair_features_are_symmetric():
  """Swapping the documents swaps u and v, keeps u * v and negates u - v; one tower reads both."""
  model = build('dual_encoder', max_segments=1, pooling='mean')
  a, b = packed_row([examples(1)[0]]), packed_row([examples(2)[0]])
  pair = lambda x, y: {**{f'{k}1': jnp.asarray(v) for k, v in x.items()},
                       **{f'{k}2': jnp.asarray(v) for k, v in y.items()}}
  f_ab = np.asarray(model.features(pair(a, b)))
  f_ba = np.asarray(model.features(pair(b, a)))
  d = 32
  assert f_ab.shape == (1, 1, 4 * d)
  np.testing.assert_allclose(f_ab[..., :d], f_ba[..., d:2 * d], atol=ATOL)
  np.testing.assert_allclose(f_ab[..., 2 * d:3 * d], f_ba[..., 2 * d:3 * d], atol=ATOL)
  np.testing.assert_allclose(f_ab[..., 3 * d:], -f_ba[..., 3 * d:], atol=ATOL)
  assert np.abs(f_ab[..., 3 * d:]).max() > MOVED
  # u is the classifier tower's pooled vector of document 1 alone.
  u = np.asarray(model.pool(jnp.asarray(a['inputs']), jnp.asarray(a['segment_ids']),
                            jnp.asarray(a['positions']), key=None))
  np.testing.assert_allclose(f_ab[..., :d], u, atol=ATOL)
  logits = np.asarray(model(pair(a, b)))
  assert logits.shape == (1, 1, C) and len(model.head.layers) == 3  # Dense(m), Dense(m/2), Dense(C)


@pytest.mark.parametrize('seg, match', [
    ([1, 1, 0, 2, 0, 0], 'do not run 1, 2, ..., n in order'),
    ([2, 2, 0, 0, 0, 0], 'do not run 1, 2, ..., n in order'),
    ([1, 3, 0, 0, 0, 0], 'do not run 1, 2, ..., n in order'),
    ([1, 2, 3, 4, 0, 0], 'segment id 4 exceeds model max_segments=3'),
])
def test_bad_segment_layouts_are_one_line_errors(seg, match):
  with pytest.raises(errors.Error, match=match):
    classifier.check_segments(jnp.asarray([seg]), S)


def test_bad_settings():
  with pytest.raises(errors.Error, match="unknown model.pooling 'max'"):
    build(pooling='max')
  with pytest.raises(errors.Error, match='needs segment_ids'):
    build(pooling='mean')({'inputs': jnp.ones((1, T), jnp.int32)})
