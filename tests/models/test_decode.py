"""Cached decoding twin tests: prefill + decode_step equal one teacher-forced forward.

For every family in attention.names(decode=True) (a family joins when it registers its
init_cache/attend_step) a tiny LM decodes two rows with different prompt lengths in one batch
(the shorter padded) to the end of the sequence; its logits at every real position equal the
causal forward over the whole sequence (Transformer-XL: the forward segment by segment with its
memory). Each case compiles twice: prefill + a scan of decode_step, and the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import attention, errors, models
from efflong.attention import dense
from tests.train import load_config_module

L = 16  # Sequence length (task.seq_len, the model's max_len; XL: two segments of L // 2).
PROMPTS = (5, 3)  # Real prompt lengths of the two rows; the prefill is max(PROMPTS) wide.
TOL = dict(rtol=1e-4, atol=1e-4)

# Each decoding family's hyper-parameters, chosen so the interesting case happens within L.
FAMILY_KW = {
    'dense': {},
    'local': dict(window=4),  # window < L
    'longformer': dict(window=4, global_tokens=1, dilation=(1, 2)),
    'strided': dict(stride=4),
    'fixed': dict(block=4, summary=1),
    'bigbird': dict(block=4, window=1, random_blocks=1, global_tokens=1),
    'linear': dict(chunk=4),  # chunk < L
    'performer': dict(chunk=4, nb_features=16),
    'lsh': dict(n_hashes=2, bucket_size=2, n_buckets=4),
    'xl': {},  # with a segment memory: XL_MEM_LEN
}
XL_MEM_LEN = 4  # < the segment length L // 2: the second segment sees part of the first


def build(attention_name: str, kind: str = 'lm', **model):
  """(model config, graphdef, state) of a tiny float32 model (d_model 32, 2 heads, 2 layers)."""
  xl = attention_name == 'xl'
  arg = f'smoke,attention={attention_name},seq_len={L // 2 if xl else L}'
  if xl:
    arg += f',mem_len={XL_MEM_LEN}'
  config = load_config_module('bytes_lm').get_config(arg)
  config.model.update(kind=kind, num_layers=2, dropout_rate=0.0, dtype='float32', **model)
  config.model.attention_kw.update(FAMILY_KW[attention_name])
  graphdef, state = nnx.split(models.build(config, rngs=nnx.Rngs(0)))
  return config, graphdef, state


def lm_reference(graphdef, state, cfg, tokens: jax.Array) -> jax.Array:
  """[B, L] tokens -> [B, L, V]: one causal forward, or XL's segments with their memory."""
  model = nnx.merge(graphdef, state)
  if not cfg.mem_len:
    return model({'inputs': tokens})
  memory, outs, seg = models.init_memory(cfg, tokens.shape[0], cfg.mem_len), [], L // 2
  for s in range(0, L, seg):
    out, memory = model({'inputs': tokens[:, s:s + seg]}, memory=memory)
    outs.append(out)
  return jnp.concatenate(outs, 1)


def decode_run(graphdef, state, prefill_batch: dict, step_tokens: jax.Array, max_len: int):
  """Prefill, then decode_step over step_tokens [n, B] (one scan): (prefill logits [B, T, V],
  step logits [n, B, V], the final cache)."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(step_tokens.shape[1], max_len)
  logits, cache = model.prefill(prefill_batch, cache)

  def step(cache, tokens):
    out, cache = model.decode_step(tokens, cache)
    return cache, out

  cache, step_logits = jax.lax.scan(step, cache, step_tokens)
  return logits, step_logits, cache


def split_sequence(tokens: np.ndarray, prompts=PROMPTS):
  """A batch of right-padded prompts (row b: its first prompts[b] tokens) and each row's
  following tokens, one per step [n, B]: every row is fed until the longest prompt's row ends."""
  width = max(prompts)
  seg = (np.arange(width)[None] < np.asarray(prompts)[:, None]).astype(np.int32)
  n = tokens.shape[1] - width
  steps = np.stack([tokens[b, p:p + n] for b, p in enumerate(prompts)], 1)  # [n, B]
  return tokens[:, :width] * seg, seg, steps


def assert_twins(prefill_logits, step_logits, cache, reference, prompts=PROMPTS):
  """Row b's prefill logits at its real prompt positions, then its step logits, against the
  reference at the same positions; every cache leaf has the batch first (beam search reorders
  rows)."""
  n = step_logits.shape[0]
  assert {leaf.shape[0] for leaf in jax.tree.leaves(cache)} == {len(prompts)}
  for b, p in enumerate(prompts):
    assert int(cache['length'][b]) == p + n
    np.testing.assert_allclose(prefill_logits[b, :p], reference[b, :p], **TOL)
    np.testing.assert_allclose(step_logits[:, b], reference[b, p:p + n], **TOL)


def tokens_for(cfg_task, seed=0) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), (2, L), 1, cfg_task.vocab_size))


CASES = [(name, {}) for name in attention.names(decode=True)] + [
    ('dense', dict(reversible=True)),
    ('dense', dict(ff_chunk_size=3, num_kv_heads=1)),
    ('dense', dict(norm='post')),
]


@pytest.mark.parametrize('name,model_kw', CASES,
                         ids=[n + ''.join(f'-{k}' for k in kw) for n, kw in CASES])
def test_lm_decode_equals_forward(name, model_kw):
  if name not in FAMILY_KW:
    pytest.fail(f'attention {name!r} decodes: give it hyper-parameters in FAMILY_KW.')
  config, graphdef, state = build(name, **model_kw)
  tokens = tokens_for(config.task)
  prompt, seg, steps = split_sequence(tokens)
  run = jax.jit(lambda state, batch, steps, tokens: (
      *decode_run(graphdef, state, batch, steps, L),
      lm_reference(graphdef, state, config.model, tokens)))  # One compilation per case.
  assert_twins(*run(state, {'inputs': prompt, 'segment_ids': seg}, steps, tokens))


def test_encoder_decoder_decode_equals_teacher_forcing():
  """Prefill encodes a padded source once (cross-attention keys/values cached), then the target
  is decoded against the teacher-forced forward."""
  config, graphdef, state = build('dense', kind='encoder_decoder')
  target = tokens_for(config.task)
  source = tokens_for(config.task, seed=1)[:, :10]
  src_seg = np.ones_like(source)
  src_seg[1, 7:] = 0
  prompts = (1, 2)
  prompt, seg, steps = split_sequence(target, prompts)
  batch = {'inputs': source, 'segment_ids': src_seg, 'decoder_inputs': prompt,
           'decoder_segment_ids': seg}
  teacher = {**batch, 'decoder_inputs': target, 'decoder_segment_ids': np.ones_like(target)}
  run = jax.jit(lambda state, batch, steps, teacher: (
      *decode_run(graphdef, state, batch, steps, L), nnx.merge(graphdef, state)(teacher)))
  prefill_logits, step_logits, cache, reference = run(state, batch, steps, teacher)
  assert cache['layers'][0]['cross']['k'].shape[:2] == source.shape
  assert_twins(prefill_logits, step_logits, cache, reference, prompts)


def test_models_that_cannot_decode_say_why(monkeypatch):
  _, graphdef, state = build('dense', kind='encoder')
  with pytest.raises(errors.Error, match='bidirectional'):
    nnx.merge(graphdef, state).init_cache(1, 8)
  monkeypatch.setitem(attention._REGISTRY, 'nodecode',
                      attention.Family('nodecode', dense.attend, decode_why='a test says so'))
  monkeypatch.setitem(FAMILY_KW, 'nodecode', {})
  _, graphdef, state = build('nodecode')
  with pytest.raises(errors.Error, match="'nodecode' cannot decode with a cache: a test says so"):
    nnx.merge(graphdef, state).init_cache(1, 8)
  _, graphdef, state = build('dense', positions='learned')
  with pytest.raises(errors.Error, match='learned position table'):
    nnx.merge(graphdef, state).init_cache(1, L + 1)


def test_decoding_past_the_cache_is_an_error():
  _, graphdef, state = build('dense')
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(2, 4)
  step = jax.jit(lambda tokens, cache: model.decode_step(tokens, cache)[1])
  for _ in range(4):  # Four positions fit.
    cache = step(jnp.ones((2,), jnp.int32), cache)
  errors.raise_pending()
  step(jnp.ones((2,), jnp.int32), cache)
  with pytest.raises(errors.CheckError, match='a row reached 5 positions, the cache holds max_len=4'):
    errors.raise_pending()
