"""Sampling and beam search (efflong.infer.decode) on tiny models, against slow twins: greedy
against re-running the whole prefix for every token, beam search against enumerating every
hypothesis."""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import config as config_lib
from efflong import errors, models
from efflong.infer import decode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L = 16  # the models' max_len
PROMPTS = np.array([[1, 2, 3, 4, 1], [3, 1, 0, 0, 0]], np.int32)  # row 1: 2 tokens, then padding
LENGTHS = np.array([5, 2], np.int32)
N = 6  # new tokens


def build(kind: str, vocab: int, seed: int) -> nnx.Module:
  """A tiny dense model (d_model 32, 2 heads, 2 layers) of the duplication smoke config."""
  config = config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config(
      f'smoke,attention=dense,seq_len={L}')
  with config.unlocked():
    config.task.vocab_size, config.model.kind = vocab, kind
  return models.build(config, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch):
  return nnx.merge(graphdef, state)(batch)


def forward(model, **batch):
  """The model's teacher-forced logits (one compiled program per shape)."""
  return _forward(*nnx.split(model), batch)


@pytest.fixture(scope='module')
def lm():
  return build('lm', 128, 0)


@pytest.fixture(scope='module')
def greedy(lm):
  return decode.generate(lm, PROMPTS, LENGTHS, max_new_tokens=N)


def test_greedy_equals_argmax_of_the_full_forward(lm, greedy):
  for row, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS)):
    seq = list(prompt[:n])
    for _ in range(N):  # the whole prefix again for every token (padded to L: causal)
      logits = forward(lm, inputs=jnp.asarray([seq + [0] * (L - len(seq))]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert greedy.tokens[row].tolist() == seq[n:]
  assert greedy.lengths.tolist() == [N, N]
  assert greedy.compile_s > 0 and greedy.run_s > 0


def test_top_k_1_and_tiny_top_p_are_greedy(lm, greedy):
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = decode.generate(lm, PROMPTS, LENGTHS, max_new_tokens=N, temperature=5.0, **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens, err_msg=str(kw))
    assert out.compile_s == 0.0  # the settings are data: one program serves them all


def test_sampling_is_deterministic_per_seed_and_varies_across_seeds(lm, greedy):
  draw = lambda seed: decode.generate(lm, PROMPTS, LENGTHS, max_new_tokens=N, temperature=1.0,
                                      seed=seed).tokens
  np.testing.assert_array_equal(draw(0), draw(0))
  draws = {draw(seed).tobytes() for seed in range(3)}
  assert len(draws) == 3 and greedy.tokens.tobytes() not in draws


def test_sample_logits_filters_and_frequencies():
  probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
  logits = jnp.log(jnp.asarray(probs))[None]
  keys = jax.random.split(jax.random.key(0), 20000)

  @jax.jit
  def frequencies(temperature, top_k, top_p):
    draws = jax.vmap(lambda key: decode.sample_logits(logits, key, temperature=temperature,
                                                      top_k=top_k, top_p=top_p)[0])(keys)
    return jnp.bincount(draws, length=4) / keys.shape[0]

  np.testing.assert_allclose(frequencies(1.0, 0, 1.0), probs, atol=0.015)
  np.testing.assert_allclose(frequencies(1.0, 3, 1.0), [4 / 9, 3 / 9, 2 / 9, 0], atol=0.015)
  # Masses before each token: 0, 0.4, 0.7, 0.9; top_p = 0.5 keeps the first two.
  np.testing.assert_allclose(frequencies(1.0, 0, 0.5), [4 / 7, 3 / 7, 0, 0], atol=0.015)
  sharp = probs ** 2 / (probs ** 2).sum()  # temperature 1/2
  np.testing.assert_allclose(frequencies(0.5, 0, 1.0), sharp, atol=0.015)
  np.testing.assert_allclose(frequencies(0.0, 0, 1.0), [1, 0, 0, 0])


def test_stop_tokens_end_rows_and_mask_what_follows(lm, greedy):
  stop = int(greedy.tokens[0, 2])
  out = decode.generate(lm, PROMPTS, LENGTHS, max_new_tokens=N, stop_tokens=(stop,))
  for row in range(2):
    full = greedy.tokens[row].tolist()
    n = full.index(stop) + 1 if stop in full else N
    assert out.lengths[row] == n
    assert out.tokens[row].tolist() == full[:n] + [0] * (N - n)
  assert out.lengths[0] <= 3


# Encoder-decoder: the source rows (the second padded), the decoder starts from token 0.
SOURCE = np.array([[1, 2, 1, 1], [2, 1, 0, 0]], np.int32)
SOURCE_LENGTHS = np.array([4, 2], np.int32)
START = np.zeros((2, 1), np.int32)


def seq2seq(model, **kw):
  return decode.generate(model, START, [1, 1], source=SOURCE, source_lengths=SOURCE_LENGTHS, **kw)


def test_one_beam_is_greedy_for_an_encoder_decoder():
  model = build('encoder_decoder', 128, 0)
  greedy, beam = (seq2seq(model, max_new_tokens=N, beams=b) for b in (0, 1))
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  assert len({tuple(row) for row in greedy.tokens}) == 2  # the source matters
  np.testing.assert_allclose(beam.scores * decode.length_penalty_of(N, 0.6), greedy.scores,
                             rtol=1e-5)


def test_beam_search_finds_the_best_hypothesis_of_all():
  """Vocabulary 3, at most 3 new tokens, token 2 stops: every hypothesis scored at once."""
  model, stop, n, alpha = build('encoder_decoder', 3, 3), 2, 3, 0.6
  # At most 2 live prefixes per step (one token of 3 stops): 8 beams prune nothing.
  out = seq2seq(model, max_new_tokens=n, beams=8, stop_tokens=(stop,), length_penalty=alpha)
  hyps = [h for size in range(1, n + 1) for h in itertools.product(range(3), repeat=size)
          if stop not in h[:-1] and (size == n or h[-1] == stop)]
  decoder_inputs = np.array([[0, *h] + [0] * (n - len(h)) for h in hyps], np.int32)
  for row in range(2):
    logp = jax.nn.log_softmax(forward(
        model, inputs=np.repeat(SOURCE[row:row + 1], len(hyps), 0),
        segment_ids=np.repeat((np.arange(4) < SOURCE_LENGTHS[row])[None], len(hyps), 0).astype(
            np.int32),
        decoder_inputs=decoder_inputs, decoder_segment_ids=np.ones_like(decoder_inputs)))
    scores = [sum(float(logp[j, i, t]) for i, t in enumerate(h)) /
              float(decode.length_penalty_of(len(h), alpha)) for j, h in enumerate(hyps)]
    best = hyps[int(np.argmax(scores))]
    assert out.tokens[row, :out.lengths[row]].tolist() == list(best)
    np.testing.assert_allclose(out.scores[row], max(scores), rtol=1e-5)
    # Greedy takes another path here: the search matters.
    first = int(np.argmax(logp[0, 0]))
    assert best[0] != first, (best, first)


@pytest.mark.parametrize('kw, message', [
    (dict(top_p=0.0), 'top_p=0.0 must be in (0, 1]'),
    (dict(top_p=1.5), 'top_p=1.5 must be in (0, 1]'),
    (dict(max_len=4), 'a prompt of 5 tokens is longer than max_len=4.'),
    (dict(max_len=8), 'a prompt of 5 tokens plus max_new_tokens=6 exceeds max_len=8; at most 3'),
    (dict(beams=2, temperature=1.0), 'beam search (beams=2) is deterministic'),
])
def test_bad_settings_are_one_line(lm, kw, message):
  with pytest.raises(errors.Error) as e:
    decode.generate(lm, PROMPTS, LENGTHS, max_new_tokens=N, **kw)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_a_model_that_cannot_decode_says_so_in_one_line():
  """Linformer is bidirectional only: the model's own error passes through."""
  config = config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config(
      f'smoke,attention=linformer,fill,seq_len={L}')
  with pytest.raises(errors.Error) as e:
    decode.generate(models.build(config, rngs=nnx.Rngs(0)), PROMPTS, LENGTHS, max_new_tokens=N)
  assert "('linformer') cannot decode with a cache" in str(e.value) and '\n' not in str(e.value)
