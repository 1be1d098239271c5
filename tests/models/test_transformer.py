"""The four model kinds: shapes and dtypes, and probes of what each output may depend on.

Probes run one batch per question: row 0 is the base sequence, each further row changes one token.
Comparing rows tells which outputs a token reaches. Every "does not change" is paired with a
"does change" so that a model that ignores its inputs cannot pass.

Models are run eagerly: XLA caches each op, so the many small configurations share compilations.
"""

import functools
import os

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from efflong import attention
from efflong.attention import linformer, lsh
from efflong import config as config_lib
from efflong import models
from efflong.nn.blocks import Block

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = 8  # Sequence length (and the task's max_len).
V = 128  # Vocabulary of the duplication task.
NUM_CLASSES = 3
ATOL = 1e-5  # "Unchanged": logits are O(1); a leak through attention moves them by far more.
MOVED = 1e-3  # "Changed".
PACKED = np.array([1, 1, 1, 2, 2, 2, 0, 0])  # Two packed segments, then padding.


def _smoke_config() -> ml_collections.ConfigDict:
  return config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config('smoke')


def make_config(kind: str = 'lm', /, **model) -> ml_collections.ConfigDict:
  config = _smoke_config()
  with config.unlocked():
    config.task.seq_len = T
    config.task.num_classes = NUM_CLASSES
    config.model.kind = kind
    config.model.update(model)
  config.lock()
  return config


@functools.lru_cache(maxsize=None)
def _build(kind: str, seed: int, model_items: tuple) -> nnx.Module:
  return models.build(make_config(kind, **dict(model_items)), rngs=nnx.Rngs(seed))


def build(kind: str = 'lm', /, seed: int = 0, **model) -> nnx.Module:
  """A (cached, never mutated) model of the smoke config with model.* overrides."""
  return _build(kind, seed, tuple(sorted(model.items())))


def tokens(batch: int = 1, length: int = T, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(1, V, (batch, length), dtype=np.int32)


def variants(base: np.ndarray, positions) -> np.ndarray:
  """[1 + len(positions), T]: base, then base with the token at each position changed."""
  rows = [base.copy()]
  for p in positions:
    row = base.copy()
    row[p] = row[p] % (V - 1) + 1  # Another token in 1..V-1.
    rows.append(row)
  return np.stack(rows)


def moved(out: np.ndarray, i: int) -> np.ndarray:
  """Per position: how far variant i's output moved from the base's (max over features)."""
  out = np.asarray(out)
  return np.abs(out[1 + i] - out[0]).reshape(out.shape[1], -1).max(-1)


ROWS = 16  # Every batch is padded to this many rows, so that all tests share compiled ops.


def run(model, key=None, **batch) -> np.ndarray:
  """model(batch) on numpy arrays [B <= ROWS, ...], returning numpy."""
  rows = len(next(iter(batch.values())))
  assert rows <= ROWS
  padded = {k: jnp.asarray(np.concatenate([v, np.repeat(v[:1], ROWS - rows, 0)]))
            for k, v in batch.items()}
  return np.asarray(model(padded, key=key))[:rows]


def lm_batch(kind: str, inputs: np.ndarray, **extra) -> dict:
  if kind == 'dual_encoder':  # the two documents (efflong/models/classifier.py)
    return dict(inputs1=inputs, inputs2=inputs[::-1], **extra)
  batch = dict(inputs=inputs, **extra)
  if kind == 'encoder_decoder':
    batch.setdefault('decoder_inputs', inputs[:, :5])
  return batch


# Shapes and dtypes.


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('kind', sorted(models.KINDS))
def test_output_shapes_and_dtypes(kind, dtype):
  model = build(kind, dtype=dtype)
  inputs = tokens(2)
  batch = lm_batch(kind, inputs)
  out = run(model, **batch)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  want = {'lm': (2, T, V), 'encoder': (2, T, V), 'encoder_decoder': (2, 5, V),
          'classifier': (2, 1, NUM_CLASSES), 'dual_encoder': (2, 1, NUM_CLASSES)}[kind]
  assert out.shape == want and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  # Parameters stay float32 whatever the compute dtype.
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert param.get_value().dtype == jnp.float32, path
  jaxpr = str(jax.make_jaxpr(lambda b: model(b))(batch))
  if dtype == 'bfloat16':
    assert 'bf16[' in jaxpr
  else:
    assert 'bf16' not in jaxpr


BF16_ROUNDING = 2.0 ** -8  # Relative error of one rounding to bfloat16 (8 significant bits).


@pytest.mark.parametrize('kind', sorted(models.KINDS))
def test_bfloat16_logits_match_float32_to_bfloat16_precision(kind):
  """A bfloat16 model's outputs equal the float32 model's (same parameters) to bf16's precision.

  Each rounding to bfloat16 adds a relative error of at most u = 2^-8, about uniform: standard
  deviation u / sqrt(3). To first order, R independent roundings along a path add up to a relative
  RMS error of u sqrt(R / 3). Roundings on the deepest path (each weight cast and each bf16 result):
  6 at the ends (embedding, positions, final norm, head weight and output, pooling), 9 per attention
  sublayer (norm, q/k/v weight and output, logits, probabilities, attention output, output weight
  and output, residual), 7 per feed-forward (norm, two weights and outputs, activation, residual):
  R = 6 + 16 L, and 6 + 41 L for encoder_decoder (through the encoder, then decoder blocks with
  cross-attention). Allowed: 3 times u sqrt(R / 3), relative to the RMS of the float32 outputs;
  the errors measured are 0.1 to 0.25 of that, so 10 times these errors fail.
  """
  batch = lm_batch(kind, tokens(2))
  got = run(build(kind, dtype='bfloat16'), **batch)
  want = run(build(kind, dtype='float32'), **batch)  # Same seed: the same parameters.
  layers = make_config(kind).model.num_layers
  roundings = 6 + (41 if kind == 'encoder_decoder' else 16) * layers
  rms = lambda x: np.sqrt(np.mean(np.square(x, dtype=np.float64)))
  bound = 3 * BF16_ROUNDING * np.sqrt(roundings / 3)
  assert rms(got - want) <= bound * rms(want), (rms(got - want) / rms(want), bound)


def test_bfloat16_dot_products_compute_in_bfloat16():
  """Every matmul of a bfloat16 model takes bfloat16 operands."""
  model = build('encoder_decoder', dtype='bfloat16')
  batch = {k: jnp.asarray(v) for k, v in lm_batch('encoder_decoder', tokens(1)).items()}
  jaxpr = jax.make_jaxpr(lambda b: model(b))(batch).jaxpr

  def dots(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from dots(sub)

  found = list(dots(jaxpr))
  assert len(found) > 10
  for eqn in found:
    assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn


# Probe 1: causality.


@pytest.mark.parametrize('norm', ['pre', 'post'])
def test_lm_is_causal(norm):
  base = tokens()[0]
  out = run(build('lm', norm=norm), inputs=variants(base, range(T)))
  for p in range(T):
    delta = moved(out, p)
    assert delta[:p].max(initial=0) < ATOL, (
        f'changing token {p} moved logits {np.flatnonzero(delta[:p] >= ATOL)}')
    assert delta[p] > MOVED
    if p < T - 1:  # ... and it reaches the future through attention.
      assert delta[p + 1:].min() > MOVED, f'token {p} does not reach positions {delta[p + 1:]}'


def test_encoder_is_bidirectional():
  base = tokens()[0]
  out = run(build('encoder'), inputs=variants(base, range(T)))
  for p in range(T):
    assert moved(out, p).min() > MOVED, f'token {p} does not reach every position'


# Probe 2: segments and padding.


@pytest.mark.parametrize('kind', ['lm', 'encoder'])
def test_segments_do_not_see_each_other_and_pads_reach_nothing(kind):
  base = tokens()[0]
  out = run(build(kind), inputs=variants(base, range(T)), segment_ids=np.tile(PACKED, (T + 1, 1)))
  real = PACKED > 0
  for p in range(T):
    delta = moved(out, p)
    others = real & (PACKED != PACKED[p])  # Real tokens of another segment (every one for a pad).
    assert delta[others].max(initial=0) < ATOL, (
        f'changing token {p} (segment {PACKED[p]}) moved real positions '
        f'{np.flatnonzero(others & (delta >= ATOL))}')
    # ... but it does reach its own segment: later tokens (lm) or every other token (encoder).
    reach = (PACKED == PACKED[p]) & (np.arange(T) != p)
    if kind == 'lm':
      reach &= np.arange(T) > p
    if PACKED[p] and reach.any():
      assert delta[reach].min() > MOVED, f'token {p} does not reach its segment: {delta}'


@pytest.mark.parametrize('kind,left', [('lm', False), ('lm', True), ('encoder', False),
                                       ('classifier', False)])
def test_padding_only_reaches_pads(kind, left):
  """Padding (at the end, or at the start: in every real token's past): changing pads leaves every
  real output alone."""
  seg = np.array([1] * 5 + [0] * 3)
  seg = seg[::-1].copy() if left else seg
  base = tokens()[0]
  out = run(build(kind), inputs=variants(base, range(T)), segment_ids=np.tile(seg, (T + 1, 1)))
  for p in range(T):
    if kind == 'classifier':
      delta = np.abs(out[1 + p] - out[0]).max(keepdims=True)
    else:
      delta = moved(out, p)
    if seg[p]:
      assert delta.max() > MOVED
    elif kind == 'classifier':
      assert delta.max() < ATOL, f'pad {p} moved the class logits'
    else:
      assert delta[seg > 0].max() < ATOL, f'pad {p} moved real positions'


@pytest.mark.parametrize('kind', ['lm', 'encoder'])
def test_packed_equals_unpacked(kind):
  """Two sequences packed in one row (positions restarting) give the outputs each gives alone."""
  a, b = tokens(1, 3, seed=1)[0], tokens(1, 3, seed=2)[0]
  pad = np.zeros(2, np.int32)
  packed = np.concatenate([a, b, pad])
  alone_a, alone_b = (np.concatenate([x, tokens(1, 5, seed=3)[0]]) for x in (a, b))
  alone_seg = np.array([1, 1, 1, 0, 0, 0, 0, 0])
  out = run(build(kind), inputs=np.stack([packed, alone_a, alone_b]),
            segment_ids=np.stack([PACKED, alone_seg, alone_seg]),
            positions=np.stack([[0, 1, 2, 0, 1, 2, 0, 0]] + [np.arange(T)] * 2))
  np.testing.assert_allclose(out[0, :3], out[1, :3], atol=ATOL)
  np.testing.assert_allclose(out[0, 3:6], out[2, :3], atol=ATOL)
  assert np.abs(out[1, :3] - out[2, :3]).max() > MOVED


# Probe 3: encoder-decoder.


def test_encoder_decoder_decoder_is_causal_and_reads_the_encoder():
  t_dec = 5
  enc, dec = tokens(1, T, seed=0)[0], tokens(1, t_dec, seed=1)[0]
  dec_rows = variants(dec, range(t_dec))
  enc_rows = variants(enc, range(T))
  # Rows: base, decoder variants (encoder as base), encoder variants (decoder as base).
  inputs = np.concatenate([enc_rows[:1], np.tile(enc, (t_dec, 1)), enc_rows[1:]])
  decoder_inputs = np.concatenate([dec_rows, np.tile(dec, (T, 1))])
  out = run(build('encoder_decoder'), inputs=inputs, decoder_inputs=decoder_inputs)
  assert out.shape == (1 + t_dec + T, t_dec, V)
  for p in range(t_dec):
    delta = moved(out, p)
    assert delta[:p].max(initial=0) < ATOL, f'decoder token {p} moved earlier positions: {delta}'
    assert delta[p:].min() > MOVED, f'decoder token {p} does not reach later positions: {delta}'
  for p in range(T):  # Every encoder token reaches every decoder position (bidirectional encoder).
    assert moved(out, t_dec + p).min() > MOVED, f'encoder token {p} does not reach the decoder'


def test_encoder_decoder_segments():
  """Decoder segment s reads only encoder segment s; pads (either side) reach no real output."""
  enc_seg, dec_seg = PACKED, np.array([1, 1, 2, 2, 0])
  enc, dec = tokens(1, T, seed=0)[0], tokens(1, 5, seed=1)[0]
  inputs = np.concatenate([variants(enc, range(T)), np.tile(enc, (5, 1))])
  decoder_inputs = np.concatenate([np.tile(dec, (T + 1, 1)), variants(dec, range(5))[1:]])
  rows = len(inputs)
  out = run(build('encoder_decoder'), inputs=inputs, decoder_inputs=decoder_inputs,
            segment_ids=np.tile(enc_seg, (rows, 1)),
            decoder_segment_ids=np.tile(dec_seg, (rows, 1)))
  real = dec_seg > 0
  for p in range(T):  # Encoder token p.
    delta = moved(out, p)
    assert delta[real & (dec_seg != enc_seg[p])].max(initial=0) < ATOL, (
        f'encoder token {p}: {delta}')
    if enc_seg[p]:
      assert delta[dec_seg == enc_seg[p]].min() > MOVED, f'encoder token {p}: {delta}'
  for p in range(5):  # Decoder token p.
    delta = moved(out, T + p)
    later = np.arange(5) > p
    assert delta[real & ~later & (np.arange(5) != p)].max(initial=0) < ATOL
    assert delta[real & (dec_seg != dec_seg[p])].max(initial=0) < ATOL, (
        f'decoder token {p}: {delta}')
    if dec_seg[p] and (later & (dec_seg == dec_seg[p])).any():
      assert delta[later & (dec_seg == dec_seg[p])].min() > MOVED


@pytest.mark.parametrize('t_enc,t_dec', [(T, 5), (5, T)])
def test_encoder_decoder_lengths_are_independent(t_enc, t_dec):
  """Cross-attention is bidirectional: a decoder longer than its encoder works (a causal cross mask
  would need T_dec <= T_enc), and the first decoder position reads the last encoder token."""
  model = build('encoder_decoder')
  assert not model.decoder.layers[0].cross_attn.causal
  enc = tokens(1, t_enc)[0]
  dec = tokens(1, t_dec, seed=1)
  out = run(model, inputs=variants(enc, [t_enc - 1]), decoder_inputs=np.concatenate([dec, dec]))
  assert out.shape == (2, t_dec, V)
  assert moved(out, 0).min() > MOVED


def test_encoder_decoder_needs_both_segment_ids_or_neither():
  model = build('encoder_decoder')
  with pytest.raises(ValueError, match='both segment_ids and decoder_segment_ids'):
    run(model, inputs=tokens(), decoder_inputs=tokens(1, 5), segment_ids=PACKED[None])


# Probe 4: classifier pooling.


def test_classifier_mean_pooling_ignores_pads():
  """A padded row classifies exactly as the same tokens unpadded."""
  model = build('classifier', pooling='mean')
  real = tokens(1, 5)
  padded = np.concatenate([np.tile(real, (2, 1)), tokens(2, 3, seed=5)], axis=1)  # Different pads.
  out = run(model, inputs=padded, segment_ids=np.tile([1] * 5 + [0] * 3, (2, 1)))
  np.testing.assert_allclose(out[0], out[1], atol=ATOL)
  np.testing.assert_allclose(out[0], run(model, inputs=real)[0], atol=ATOL)
  # Without segment ids the pads are real tokens and count.
  assert np.abs(run(model, inputs=padded)[0] - out[0]).max() > MOVED


def test_classifier_pooling_first_and_mean_differ():
  inputs = tokens(2)
  mean = run(build('classifier', pooling='mean'), inputs=inputs)
  first = run(build('classifier', pooling='first'), inputs=inputs)
  assert np.abs(mean - first).max() > MOVED
  # 'first' still reads the whole (bidirectional) sequence.
  out = run(build('classifier', pooling='first'), inputs=variants(inputs[0], [T - 1]))
  assert np.abs(out[1] - out[0]).max() > MOVED


# Configuration variants.


@pytest.mark.parametrize('kind', ['lm', 'encoder_decoder'])
def test_pre_and_post_ln(kind):
  batch = lm_batch(kind, tokens(2))
  pre, post = build(kind, norm='pre'), build(kind, norm='post')
  assert pre.embedder is not None
  stacks = [m.stack if kind == 'lm' else m.decoder for m in (pre, post)]
  assert stacks[0].final_norm is not None and stacks[1].final_norm is None
  out_pre, out_post = run(pre, **batch), run(post, **batch)
  assert np.all(np.isfinite(out_post))
  assert np.abs(out_pre - out_post).max() > MOVED


@pytest.mark.parametrize('norm', ['pre', 'post'])
def test_block_residual_form(norm):
  """pre-LN: x + f(norm(x)) keeps a large residual stream; post-LN: norm(x + f(x)) is normed."""
  cfg = make_config('lm', norm=norm).model
  block = Block(cfg, causal=True, cross=False, attention_kw={}, dtype=jnp.float32,
                rngs=nnx.Rngs(0))
  x = 100.0 * jnp.asarray(np.random.default_rng(0).standard_normal((ROWS, T, cfg.d_model)),
                          jnp.float32)
  out = np.asarray(block(x, segment_ids=None, key=None))
  if norm == 'pre':
    assert np.abs(out - x).max() < 0.2 * np.abs(x).max()
    assert np.abs(out - x).max() > MOVED
  else:
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(-1), 1.0, atol=1e-2)


def test_tied_and_untied_embeddings():
  inputs = tokens(2)
  tied, untied = build('lm', tie_embeddings=True), build('lm', tie_embeddings=False)
  assert tied.embedder.head is None and untied.embedder.head is not None
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  d = make_config().model.d_model
  assert count(untied) - count(tied) == d * V + V
  # Tied logits score hidden states against the token embeddings: editing the embedding of a token
  # absent from the input moves that token's logits and nothing else; untied, it moves nothing.
  # (A random edit: a constant one is orthogonal to layer-normed hidden states.)
  absent = np.setdiff1d(np.arange(V), inputs)[0]
  for model, tie in ((tied, True), (untied, False)):
    edited = nnx.clone(model)
    table = edited.embedder.embed.embedding
    table[...] = table[...].at[absent].add(np.random.default_rng(0).standard_normal(table.shape[1]))
    delta = np.abs(run(edited, inputs=inputs) - run(model, inputs=inputs)).max((0, 1))
    assert delta[np.arange(V) != absent].max() < ATOL
    assert (delta[absent] > MOVED) == tie


@pytest.mark.parametrize('positions', ['sinusoidal', 'learned', 'none'])
def test_positions(positions):
  """Without positions a bidirectional encoder is permutation-equivariant; with them it is not."""
  model = build('encoder', positions=positions)
  inputs = tokens(1)
  perm = np.random.default_rng(0).permutation(T)
  out = run(model, inputs=np.concatenate([inputs, inputs[:, perm]]))
  if positions == 'none':
    np.testing.assert_allclose(out[1], out[0][perm], atol=ATOL)
  else:
    assert np.abs(out[1] - out[0][perm]).max() > MOVED
  # Explicit positions 0..T-1 are the default.
  explicit = run(model, inputs=inputs, positions=np.arange(T)[None])
  np.testing.assert_allclose(explicit, out[:1], atol=ATOL)
  has_table = any('learned' in path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert has_table == (positions == 'learned')


@pytest.mark.parametrize('kind', ['lm', 'encoder_decoder', 'classifier'])
def test_dropout(kind):
  model, plain = build(kind, dropout_rate=0.3), build(kind, dropout_rate=0.0)
  batch = lm_batch(kind, tokens(2))
  base = run(model, **batch)
  np.testing.assert_array_equal(run(model, key=None, **batch), base)  # Deterministic ...
  np.testing.assert_array_equal(run(plain, **batch), base)  # ... and exactly no dropout.
  k1, k2 = jax.random.key(1), jax.random.key(2)
  drop1 = run(model, key=k1, **batch)
  assert np.abs(drop1 - base).max() > MOVED
  np.testing.assert_array_equal(run(model, key=k1, **batch), drop1)  # A key replays its mask.
  assert np.abs(run(model, key=k2, **batch) - drop1).max() > MOVED


def test_grouped_kv_heads():
  model = build('lm', num_heads=4, num_kv_heads=2)
  attn = model.stack.layers[0].self_attn
  d = make_config().model.d_model
  assert attn.q.kernel.shape == (d, 4, d // 4) and attn.k.kernel.shape == (d, 2, d // 4)
  base = tokens()[0]
  out = run(model, inputs=variants(base, [3]))
  assert moved(out, 0)[:3].max() < ATOL and moved(out, 0)[3:].min() > MOVED
  with pytest.raises(ValueError, match='num_kv_heads=3 must divide num_heads=4'):
    build('lm', num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize('field,value,match', [
    ('kind', 'decoder', r"unknown model.kind 'decoder'; valid: \['classifier'"),
    ('norm', 'sandwich', r"unknown model.norm 'sandwich'; valid: \['pre', 'post'\]"),
    ('activation', 'swish', r"unknown model.activation 'swish'"),
    ('positions', 'rope', r"unknown model.positions 'rope'"),
    ('pooling', 'max', r"unknown model.pooling 'max'"),
    ('attention', 'nope', r"unknown attention 'nope'"),
])
def test_bad_model_config_values(field, value, match):
  kind = 'classifier' if field == 'pooling' else 'lm'
  with pytest.raises(ValueError, match=match):
    models.build(make_config(kind, **{field: value}), rngs=nnx.Rngs(0))


def test_attention_kw_reach_the_attention_family():
  """attention_kw (the eval-time override path) changes the model; scale 0 is uniform attention."""
  config = make_config('lm')
  inputs = tokens(1)
  default = models.build(config, rngs=nnx.Rngs(0))
  uniform = models.build(config, attention_kw={'scale': 0.0}, rngs=nnx.Rngs(0))
  assert np.abs(run(default, inputs=inputs) - run(uniform, inputs=inputs)).max() > MOVED
  with pytest.raises(TypeError, match='window'):
    models.build(config, attention_kw={'window': 2}, rngs=nnx.Rngs(0))


# Logical axis names.


EXPECTED_SPECS = {  # Path suffix -> PartitionSpec under DEFAULT_RULES.
    ('self_attn', 'q', 'kernel'): P('fsdp', 'model', None),
    ('self_attn', 'k', 'kernel'): P('fsdp', 'model', None),
    ('self_attn', 'v', 'kernel'): P('fsdp', 'model', None),
    ('self_attn', 'o', 'kernel'): P('model', None, 'fsdp'),
    ('cross_attn', 'q', 'kernel'): P('fsdp', 'model', None),
    ('cross_attn', 'o', 'kernel'): P('model', None, 'fsdp'),
    ('ff', 'wi', 'kernel'): P('fsdp', 'model'),
    ('ff', 'wi', 'bias'): P('model'),
    ('ff', 'wo', 'kernel'): P('model', 'fsdp'),
    ('ff_norm', 'scale'): P('fsdp'),
    ('embed', 'embedding'): P('model', 'fsdp'),
    ('embedder', 'head', 'kernel'): P('fsdp', 'model'),
    ('positions', 'learned', 'table'): P(None, 'fsdp'),
    ('classifier_head', 'kernel'): P('fsdp', None),
    ('classifier_head', 'bias'): P(None),  # [num_classes]: small, replicated.
}
LOGICAL = {name for name, _ in config_lib.DEFAULT_RULES}


@pytest.mark.parametrize('kind', sorted(models.KINDS))
def test_parameters_carry_logical_axis_names(kind):
  model = build(kind, positions='learned')
  params = nnx.state(model, nnx.Param)
  with nnx.logical_axis_rules(list(config_lib.DEFAULT_RULES)):
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
  seen = set()
  for path, param in nnx.to_flat_state(params):
    names = param.get_metadata().get('out_sharding')
    assert names is not None and len(names) == param.ndim, f'{path}: {names}'
    assert set(names) - {None} <= LOGICAL, f'{path}: {names}'
    spec = specs[path].get_value()
    classifier = kind in ('classifier', 'dual_encoder')
    key = ('classifier_head',) + path[-1:] if classifier and path[0] == 'head' else path
    assert len(spec) == param.ndim
    assert any(spec) or key == ('classifier_head', 'bias'), f'{path} is fully replicated: {spec}'
    for suffix, want in EXPECTED_SPECS.items():
      if tuple(key[-len(suffix):]) == suffix:
        assert spec == want, f'{path}: {spec} != {want}'
        seen.add(suffix)
  assert ('self_attn', 'q', 'kernel') in seen and ('ff', 'wi', 'kernel') in seen
  assert (('cross_attn', 'q', 'kernel') in seen) == (kind == 'encoder_decoder')
  assert (('classifier_head', 'kernel') in seen) == (kind in ('classifier', 'dual_encoder'))


def test_heads_must_divide_d_model():
  with pytest.raises(ValueError, match='model.d_model=30 is not divisible by model.num_heads=4'):
    build('lm', d_model=30, num_heads=4)


def test_classifier_has_no_vocabulary_head():
  model = build('classifier', tie_embeddings=False)
  assert model.embedder.head is None


def test_dropout_rate_must_be_below_one():
  with pytest.raises(ValueError, match=r'model.dropout_rate=1.0 must be in \[0, 1\)'):
    build('lm', dropout_rate=1.0)


# Sparse families through config alone.


def family_model(name: str, kind: str = 'lm', **attention_kw) -> nnx.Module:
  """The smoke model of configs/duplication.py:attention=<name> at length T."""
  config = config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config(
      f'attention={name},smoke,seq_len={T}')
  config.model.kind = kind
  config.model.attention_kw.update(attention_kw)
  return models.build(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', [n for n in attention.names()
                                  if n != 'dense' and attention.get(n).causal])
def test_every_family_builds_from_config_alone_and_stays_causal(name):
  """configs/duplication.py:attention=<name> gives a causal lm; only longformer, bigbird, performer,
  lsh and xl own a family module (global projections, the layer index, the feature matrix, the
  hashing key, W_R / u / v).
  lsh runs its default causal band form with several chunks (bucket_size 2 at T = 8)."""
  model = family_model(name, **({'bucket_size': 2} if name == 'lsh' else {}))
  projections = [path for path, _ in nnx.iter_graph(model) if 'family_module' in path]
  assert bool(projections) == (name in ('longformer', 'bigbird', 'performer', 'lsh', 'xl'))
  base = tokens()[0]
  out = run(model, inputs=variants(base, (0, T // 2)))
  assert moved(out, 1)[:T // 2].max() < ATOL and moved(out, 1)[T // 2] > MOVED
  assert moved(out, 0)[1:].max() > MOVED


@pytest.mark.parametrize('share', ['none', 'layerwise'])
def test_linformer_encoder_builds_from_config_and_refuses_the_lm(share):
  """Bidirectional: every output moves with any token; one E for all layers when layerwise."""
  model = family_model('linformer', 'encoder', k=4, share=share)
  projections = [m for _, m in nnx.iter_graph(model) if isinstance(m, linformer.Projections)]
  assert len(projections) == (1 if share == 'layerwise' else 2)
  base = tokens()[0]
  out = run(model, inputs=variants(base, (T - 1,)))
  assert moved(out, 0).min() > MOVED
  with pytest.raises(ValueError, match="'linformer' does not support causal masking: its proj"):
    family_model('linformer', k=4)


def test_lsh_chunked_form_lets_future_tokens_move_past_outputs():
  """The model-level probe of test_every_family_builds_from_config_alone_and_stays_causal fails for
  LSH's chunked form (causal_band=False): changing later tokens re-sorts the buckets and moves the
  chunk boundaries, so earlier outputs move (the band form, the default, passes it)."""
  model = family_model('lsh', bucket_size=2, causal_band=False, attend_across_buckets=True)
  out = run(model, inputs=variants(tokens()[0], range(T // 2, T)))
  assert max(moved(out, i)[:T // 2].max() for i in range(T // 2)) > MOVED


def test_lsh_layers_share_queries_and_keys_and_get_fresh_hash_keys_each_step():
  model = family_model('lsh')
  assert all(layer.self_attn.k is None for layer in model.stack.layers)
  hash_keys = lambda: [np.asarray(m.key[...]) for _, m in nnx.iter_graph(model)
                       if isinstance(m, lsh.HashRng)]
  before = hash_keys()
  attention.before_step(model, jax.random.key(5), jnp.int32(1))
  after = hash_keys()
  assert len(after) == 2 and not np.array_equal(after[0], after[1])
  assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def test_global_tokens_from_the_batch():
  """Flags from the batch change a longformer lm; a family without globals refuses them."""
  flags = np.zeros((1, T), bool)
  flags[0, 2] = True
  inputs = tokens(1)
  lf = family_model('longformer', 'encoder', window=1, global_tokens=1)
  first = run(lf, inputs=inputs)   # Position 0 is the global token.
  flagged = run(lf, inputs=inputs, global_tokens=flags)
  assert np.abs(first - flagged).max() > MOVED
  local = family_model('local', 'encoder', window=1)
  with pytest.raises(ValueError, match="local attention has no global tokens"):
    run(local, inputs=inputs, global_tokens=flags)
