"""Sampling and beam search (efflong.infer.decode) against slow twins that re-run the whole prefix."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efflong import errors
from efflong.infer import decode

V, D, MAX_LEN = 5, 8, 16


class PrefixLM(nnx.Module):
  """A causal LM with an O(1) cache: position t's logits are W tanh(sum_{s<=t} E[x_s] + P[t])."""

  def __init__(self, vocab: int = V, seed: int = 0, scale: float = 1.0):
    rngs, self.scale = nnx.Rngs(seed), scale
    self.embed = nnx.Embed(vocab, D, rngs=rngs)
    self.pos = nnx.Embed(MAX_LEN, D, rngs=rngs)
    self.out = nnx.Linear(D, vocab, rngs=rngs)

  def __call__(self, tokens):
    h = jnp.cumsum(self.embed(tokens), 1) + self.pos(jnp.arange(tokens.shape[1]))
    return self.scale * self.out(jnp.tanh(h))

  def init_cache(self, batch_size, max_len):
    del max_len
    return {'length': jnp.zeros((batch_size,), jnp.int32), 'sum': jnp.zeros((batch_size, D))}

  def prefill(self, batch, cache):
    real = batch['segment_ids']
    x = self.embed(batch['inputs']) * real[..., None]
    h = cache['sum'][:, None] + jnp.cumsum(x, 1)
    logits = self.out(jnp.tanh(h + self.pos(cache['length'][:, None] + jnp.arange(x.shape[1]))))
    logits = self.scale * logits
    return logits, {'length': cache['length'] + real.sum(1), 'sum': cache['sum'] + x.sum(1)}

  def decode_step(self, tokens, cache):
    logits, cache = self.prefill({'inputs': tokens[:, None],
                                  'segment_ids': jnp.ones_like(tokens)[:, None]}, cache)
    return logits[:, 0], cache


PROMPTS = np.array([[1, 2, 3, 4, 1], [3, 1, 0, 0, 0]], np.int32)  # row 1: 2 tokens, then padding
LENGTHS = np.array([5, 2], np.int32)
N = 6


def slow_greedy(forward, prompt, n):
  """Greedy continuation of one prompt [T] by re-running the whole prefix for every token."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(jnp.argmax(forward(jnp.asarray([seq], jnp.int32))[0, -1])))
  return seq[len(prompt):]


@pytest.fixture(scope='module')
def model():
  return PrefixLM()


@pytest.fixture(scope='module')
def greedy(model):
  return decode.generate(model, PROMPTS, LENGTHS, max_new_tokens=N)


def test_greedy_equals_argmax_of_the_full_forward(model, greedy):
  for row, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS)):
    assert greedy.tokens[row].tolist() == slow_greedy(model, prompt[:n], N)
  assert greedy.lengths.tolist() == [N, N]
  assert greedy.compile_s > 0 and greedy.run_s > 0


def test_top_k_1_and_tiny_top_p_are_greedy(model, greedy):
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = decode.generate(model, PROMPTS, LENGTHS, max_new_tokens=N, temperature=5.0, **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens, err_msg=str(kw))
    assert out.compile_s == 0.0  # the settings are data: one program serves them all


def test_sampling_is_deterministic_per_seed_and_varies_across_seeds(model):
  draw = lambda seed: decode.generate(model, PROMPTS, LENGTHS, max_new_tokens=N, temperature=3.0,
                                      seed=seed).tokens
  np.testing.assert_array_equal(draw(0), draw(0))
  assert len({draw(seed).tobytes() for seed in range(4)}) > 1


def test_sample_logits_filters_and_frequencies():
  probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
  logits = jnp.log(jnp.asarray(probs))[None]
  keys = jax.random.split(jax.random.key(0), 20000)

  @jax.jit
  def counts(temperature, top_k, top_p):
    draws = jax.vmap(lambda key: decode.sample_logits(logits, key, temperature=temperature,
                                                      top_k=top_k, top_p=top_p)[0])(keys)
    return jnp.bincount(draws, length=4) / keys.shape[0]

  np.testing.assert_allclose(counts(1.0, 0, 1.0), probs, atol=0.015)
  np.testing.assert_allclose(counts(1.0, 3, 1.0), [4 / 9, 3 / 9, 2 / 9, 0], atol=0.015)
  # Masses before each token: 0, 0.4, 0.7, 0.9; top_p = 0.5 keeps the first two.
  np.testing.assert_allclose(counts(1.0, 0, 0.5), [4 / 7, 3 / 7, 0, 0], atol=0.015)
  sharp = np.exp(2 * np.log(probs)) / np.exp(2 * np.log(probs)).sum()  # temperature 1/2
  np.testing.assert_allclose(counts(0.5, 0, 1.0), sharp, atol=0.015)
  np.testing.assert_allclose(counts(0.0, 0, 1.0), [1, 0, 0, 0])


def test_stop_tokens_end_rows_and_mask_what_follows(model, greedy):
  stop = int(greedy.tokens[0, 2])
  out = decode.generate(model, PROMPTS, LENGTHS, max_new_tokens=N, stop_tokens=(stop,))
  for row in range(2):
    full = greedy.tokens[row].tolist()
    n = full.index(stop) + 1 if stop in full else N
    assert out.lengths[row] == n
    assert out.tokens[row].tolist() == full[:n] + [0] * (N - n)
  assert out.lengths[0] <= 3


def test_one_beam_is_greedy(model, greedy):
  out = decode.generate(model, PROMPTS, LENGTHS, max_new_tokens=N, beams=1)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  beam = decode.generate(model, PROMPTS, LENGTHS, max_new_tokens=N, beams=2, length_penalty=0.0)
  assert beam.scores.min() >= greedy.scores.min() - 1e-5  # the search finds at least greedy's


def brute_force_best(forward, vocab, prompt, n, stop, alpha):
  """The best hypothesis of at most n tokens (ending at its first stop token, or at n) by
  log p / GNMT length penalty, enumerating every sequence."""
  best = (-np.inf, None)
  for length in range(1, n + 1):
    for hyp in itertools.product(range(vocab), repeat=length):
      if stop in hyp[:-1] or (length < n and hyp[-1] != stop):
        continue
      logp = jax.nn.log_softmax(forward(jnp.asarray([list(prompt) + list(hyp)]))[0])
      total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(hyp))
      best = max(best, (total / float(decode.length_penalty_of(length, alpha)), hyp))
  return best


def test_beam_search_finds_the_brute_force_best():
  model, stop, n, alpha = PrefixLM(vocab=3, seed=7, scale=4.0), 2, 3, 0.6
  run = lambda beams: decode.generate(model, PROMPTS % 3, LENGTHS, max_new_tokens=n, beams=beams,
                                      stop_tokens=(stop,), length_penalty=alpha)
  # At most 2 live prefixes per step (3 tokens, one stops), 2^2 * 3 extensions: 8 beams prune none.
  out, narrow = run(8), run(1)
  best = [brute_force_best(model, 3, PROMPTS[row, :LENGTHS[row]] % 3, n, stop, alpha)
          for row in range(2)]
  for row, (score, hyp) in enumerate(best):
    assert out.tokens[row, :out.lengths[row]].tolist() == list(hyp)
    np.testing.assert_allclose(out.scores[row], score, rtol=1e-5)
  assert narrow.scores[1] < best[1][0] - 1e-3  # one beam misses row 1's best: pruning matters


@pytest.mark.parametrize('kw, message', [
    (dict(top_p=0.0), 'top_p=0.0 must be in (0, 1]'),
    (dict(top_p=1.5), 'top_p=1.5 must be in (0, 1]'),
    (dict(max_len=4), 'a prompt of 5 tokens is longer than max_len=4.'),
    (dict(max_len=8), 'a prompt of 5 tokens plus max_new_tokens=6 exceeds max_len=8; at most 3'),
    (dict(beams=2, temperature=1.0), 'beam search (beams=2) is deterministic'),
])
def test_bad_settings_are_one_line(model, kw, message):
  with pytest.raises(errors.Error) as e:
    decode.generate(model, PROMPTS, LENGTHS, max_new_tokens=N, **kw)
  assert message in str(e.value) and '\n' not in str(e.value)
