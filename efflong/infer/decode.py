"""Generation from a decodable model: sampling (greedy, temperature, top-k, top-p) and beam search.

Knows no attention family: it drives the model API of the decoding interface,

  model.init_cache(batch_size, max_len, kv_dtype=...) -> cache   # a pytree, every leaf [B, ...]
  model.prefill(batch, cache) -> (logits [B, T, V], cache)
  model.decode_step(tokens [B], cache) -> (logits [B, V], cache)

inside one compiled program per shape: prefill of the right-padded prompts, then a loop of decode
steps (jax.lax.while_loop), each picking the next token of every row. The sampling settings
(temperature, top_k, top_p, seed, length_penalty) are data of that program, so changing them does
not compile it again; the shapes, max_new_tokens, max_len, beams and stop tokens are its constants.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efflong import errors
from efflong.nn import kv_cache

Cache = Any  # the model's cache pytree


@dataclasses.dataclass(frozen=True)
class Generated:
  """What `generate` returns.

  Attributes:
    tokens: [B, max_new_tokens] int32 new tokens; 0 after a row's end.
    lengths: [B] int32 number of new tokens of each row (its first stop token included).
    scores: [B] float32 the chosen hypothesis' log-probability (beam search: divided by the
      length penalty); for sampling, the log-probability of the drawn tokens under the model.
    compile_s: seconds spent compiling the program (0 when it was compiled by an earlier call).
    run_s: seconds spent running it (prefill and decoding).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  scores: np.ndarray
  compile_s: float
  run_s: float


def check_options(*, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, beams: int = 0, length_penalty: float = 0.6) -> None:
  """Raises a one-line errors.Error for a setting outside its valid range."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise errors.Error(f'max_new_tokens={max_new_tokens!r} must be an int >= 1.')
  if not (math.isfinite(temperature) and temperature >= 0):
    raise errors.Error(f'temperature={temperature!r} must be >= 0 (0: greedy).')
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise errors.Error(f'top_k={top_k!r} must be an int >= 0 (0: no top-k filter).')
  if not 0 < top_p <= 1:
    raise errors.Error(f'top_p={top_p!r} must be in (0, 1] (1: no nucleus filter).')
  if not isinstance(beams, (int, np.integer)) or beams < 0:
    raise errors.Error(f'beams={beams!r} must be an int >= 0 (0: sampling, no beam search).')
  if beams and (temperature or top_k or top_p != 1):
    raise errors.Error(f'beam search (beams={beams}) is deterministic: it takes no temperature, '
                       f'top_k or top_p (got {temperature}, {top_k}, {top_p}).')
  if not (math.isfinite(length_penalty) and length_penalty >= 0):
    raise errors.Error(f'length_penalty={length_penalty!r} must be >= 0 (0: none).')


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: jax.Array | float,
                  top_k: jax.Array | int, top_p: jax.Array | float) -> jax.Array:
  """Next tokens from logits: argmax when temperature is 0, else a draw.

  The draw is from softmax(logits / temperature) restricted to the top_k most likely tokens
  (0: all of them), then to the nucleus: the most likely tokens whose probabilities, added in
  decreasing order, first reach top_p (Holtzman et al. 2020, "The Curious Case of Neural Text
  Degeneration", section 3.1); the most likely token is always kept. Tokens tied with the least
  likely kept one are kept too. The settings may be traced values.

  Args:
    logits: [B, V].
    key: a jax.random key.
    temperature: >= 0.
    top_k: >= 0.
    top_p: in (0, 1].
  Returns:
    [B] int32 tokens.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, -1)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  ordered = -jnp.sort(-scaled, axis=-1)  # [B, V], decreasing
  rank = jnp.arange(logits.shape[-1])
  in_top_k = (top_k <= 0) | (rank < top_k)
  probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, -1) - probs  # the mass of the strictly more likely tokens
  kept = in_top_k & (mass_before < top_p)
  threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), -1, keepdims=True)
  drawn = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def length_penalty_of(length: jax.Array, alpha: jax.Array | float) -> jax.Array:
  """GNMT's length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, section 7); a hypothesis'
  score is its log-probability divided by it."""
  return ((5.0 + length) / 6.0) ** alpha


def reorder_rows(cache: Cache, rows: jax.Array) -> Cache:
  """cache with its rows replaced by rows [B'] (indices into the old rows): every cache leaf has
  the batch on axis 0. Beam search uses it to follow each beam's parent."""
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)


@dataclasses.dataclass(frozen=True)
class _Static:
  """The constants of one compiled program."""
  max_new_tokens: int
  max_len: int
  stop_tokens: tuple[int, ...]
  beams: int
  kv_dtype: str


def _segment_ids(tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """[B, T] 1 on each row's first lengths[b] positions, 0 on its right-padding."""
  return (jnp.arange(tokens.shape[1]) < lengths[:, None]).astype(jnp.int32)


def _prefill(model: nnx.Module, static: _Static, prompts: jax.Array, lengths: jax.Array,
             source: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, Cache]:
  """Prefills the prompts [B, T] (after an encoder-decoder's source [B, S] with its lengths):
  (each row's logits after its last prompt token [B, V], cache)."""
  cache = model.init_cache(prompts.shape[0], static.max_len, kv_dtype=static.kv_dtype)
  if source is None:
    batch = {'inputs': prompts, 'segment_ids': _segment_ids(prompts, lengths)}
  else:
    batch = {'inputs': source[0], 'segment_ids': _segment_ids(*source), 'decoder_inputs': prompts,
             'decoder_segment_ids': _segment_ids(prompts, lengths)}
  logits, cache = model.prefill(batch, cache)
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache


def _is_stop(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
  return jnp.any(tokens[..., None] == jnp.asarray(stop_tokens, jnp.int32), axis=-1)


def _sample_program(graphdef, static: _Static, state, prompts, lengths, source, options):
  """(tokens [B, N], lengths [B], log-probabilities [B]) of sampling; options: temperature,
  top_k, top_p, seed."""
  model = nnx.merge(graphdef, state)
  logits, cache = _prefill(model, static, prompts, lengths, source)
  b, n = prompts.shape[0], static.max_new_tokens
  key = jax.random.key(options['seed'])

  def pick(i, logits, tokens, done, count, logp):
    """Token i of every row from its logits [B, V]; rows already done add nothing."""
    token = sample_logits(logits, jax.random.fold_in(key, i), temperature=options['temperature'],
                          top_k=options['top_k'], top_p=options['top_p'])
    token = jnp.where(done, 0, token)
    token_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]
    logp = logp + jnp.where(done, 0.0, token_logp)
    count = count + (~done).astype(jnp.int32)
    return tokens.at[:, i].set(token), done | _is_stop(token, static.stop_tokens), count, logp

  first = pick(0, logits, jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), bool),
               jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32))

  def cond(carry):
    i, _, (_, done, _, _) = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, cache, (tokens, done, count, logp) = carry
    logits, cache = model.decode_step(tokens[:, i - 1], cache)
    return i + 1, cache, pick(i, logits, tokens, done, count, logp)

  _, _, (tokens, _, count, logp) = jax.lax.while_loop(cond, body, (1, cache, first))
  return tokens, count, logp


def _beam_program(graphdef, static: _Static, state, prompts, lengths, source, options):
  """(tokens [B, N], lengths [B], scores [B]) of the best hypothesis of a beam search.

  K beams per row. Each step extends every live beam by every token, keeps the 2K most likely
  extensions, and splits them: those ending in a stop token (or reaching max_new_tokens) join the
  row's finished hypotheses, scored log p / length penalty, of which the best K are kept; the K
  most likely others are the next live beams, whose cache rows follow their parents. 2K
  extensions leave K live ones even when K of them stop. The answer is the best finished one.
  """
  model = nnx.merge(graphdef, state)
  logits, cache = _prefill(model, static, prompts, lengths, source)
  b, n, k = prompts.shape[0], static.max_new_tokens, static.beams
  # Every beam starts as its row's prompt; only beam 0 is live, so the first step does not
  # extend K copies of it.
  cache = reorder_rows(cache, jnp.repeat(jnp.arange(b), k))
  logits = jnp.repeat(logits, k, axis=0)
  beam_logp = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
  vocab = logits.shape[-1]

  def extend(i, logits, cache, beams, beam_logp, finished, finished_score):
    """One step: logits [B K, V] of the live beams [B, K, N] after their token i - 1."""
    logp = jax.nn.log_softmax(logits.reshape(b, k, vocab)) + beam_logp[..., None]
    cand_logp, cand = jax.lax.top_k(logp.reshape(b, k * vocab), 2 * k)  # [B, 2K]
    parent, token = cand // vocab, (cand % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(beams, parent[..., None], axis=1).at[:, :, i].set(token)
    ends = _is_stop(token, static.stop_tokens) | (i == n - 1)
    score = cand_logp / length_penalty_of(i + 1.0, options['length_penalty'])
    finished_score, best = jax.lax.top_k(
        jnp.concatenate([finished_score, jnp.where(ends, score, -jnp.inf)], 1), k)
    finished = jnp.take_along_axis(jnp.concatenate([finished, cand_seqs], 1), best[..., None], 1)
    beam_logp, live = jax.lax.top_k(jnp.where(ends, -jnp.inf, cand_logp), k)
    beams = jnp.take_along_axis(cand_seqs, live[..., None], axis=1)
    rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, live, 1)).reshape(-1)
    return reorder_rows(cache, rows), beams, beam_logp, finished, finished_score

  zeros = jnp.zeros((b, k, n), jnp.int32)
  carry = extend(0, logits, cache, zeros, beam_logp, zeros, jnp.full((b, k), -jnp.inf))

  def body(i, carry):
    cache, beams, *rest = carry
    logits, cache = model.decode_step(beams[:, :, i - 1].reshape(-1), cache)
    return extend(i, logits, cache, beams, *rest)

  _, _, _, finished, finished_score = jax.lax.fori_loop(1, n, body, carry)
  tokens, score = finished[:, 0], finished_score[:, 0]  # top_k sorts: the best comes first
  ends = _is_stop(tokens, static.stop_tokens)
  count = jnp.where(jnp.any(ends, 1), jnp.argmax(ends, 1) + 1, n).astype(jnp.int32)
  return jnp.where(jnp.arange(n) < count[:, None], tokens, 0), count, score


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, static: _Static, treedef: Any,
              avals: tuple[tuple[tuple[int, ...], Any], ...]) -> Any:
  """The compiled program for these constants and argument shapes (kept for later calls)."""
  program = _beam_program if static.beams else _sample_program
  args = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in avals])
  return jax.jit(program, static_argnums=(0, 1)).lower(graphdef, static, *args).compile()


def generate(model: nnx.Module, prompts: Any, prompt_lengths: Any, *, max_new_tokens: int,
             max_len: int | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (), beams: int = 0,
             length_penalty: float = 0.6, source: Any = None, source_lengths: Any = None,
             kv_dtype: str = 'float') -> Generated:
  """Continues each prompt by up to max_new_tokens tokens.

  Sampling (beams = 0): every row draws its next token with `sample_logits` (temperature 0:
  greedy) under a key that depends on seed and the step only. Beam search (beams >= 1): the
  hypothesis of highest log p / length_penalty_of(|Y|, length_penalty) found with that many beams
  per row (one beam without stop tokens is greedy).
  A row ends at its first stop token (kept in the output); the tokens after it are 0.

  Args:
    model: a decodable model (init_cache / prefill / decode_step); a model that cannot decode
      raises its own error.
    prompts: [B, T] int tokens, right-padded.
    prompt_lengths: [B] int, each in [1, T]: the real tokens of each row.
    max_new_tokens: the most tokens to add.
    max_len: the longest sequence (prompt and new tokens) the cache holds; None: the longest
      prompt plus max_new_tokens. The model may allow less (e.g. a learned position table).
    temperature, top_k, top_p: see sample_logits.
    seed: the sampling seed.
    stop_tokens: tokens that end a row.
    beams: beam width; 0: sampling.
    length_penalty: GNMT's alpha for beam search.
    source: an encoder-decoder's source [B, S] int tokens, right-padded (the prompts are then the
      decoder's, at least its start token); None for a language model.
    source_lengths: [B] int real tokens of each source row (None: all S).
    kv_dtype: the self-attention caches' keys and values: 'float' or 'int8' (per-token scales,
      efflong.nn.kv_cache; the model's family must cache keys and values).
  Returns:
    Generated.
  Raises:
    errors.Error: a setting outside its range, an unknown kv_dtype, a prompt length outside
      [1, T], or a prompt that with max_new_tokens does not fit in max_len.
  """
  check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                beams=beams, length_penalty=length_penalty)
  kv_cache.check_dtype(kv_dtype)
  prompts, lengths = np.asarray(prompts, np.int32), np.asarray(prompt_lengths, np.int32)
  if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
    raise errors.Error(f'prompts must be [B, T] with prompt_lengths [B]; got shapes '
                       f'{prompts.shape} and {lengths.shape}.')
  if lengths.min() < 1 or lengths.max() > prompts.shape[1]:
    raise errors.Error(f'prompt_lengths {lengths.tolist()} must be in [1, {prompts.shape[1]}] '
                       '(a prompt needs at least one token).')
  longest = int(lengths.max())
  max_len = longest + max_new_tokens if max_len is None else max_len
  if longest > max_len:
    raise errors.Error(f'a prompt of {longest} tokens is longer than max_len={max_len}.')
  if longest + max_new_tokens > max_len:
    raise errors.Error(f'a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} '
                       f'exceeds max_len={max_len}; at most {max_len - longest} new tokens fit.')
  static = _Static(max_new_tokens, max_len, tuple(int(t) for t in stop_tokens), beams, kv_dtype)
  graphdef, state = nnx.split(model)
  options = {'temperature': np.float32(temperature), 'top_k': np.int32(top_k),
             'top_p': np.float32(top_p), 'seed': np.int32(seed),
             'length_penalty': np.float32(length_penalty)}
  if source is not None:
    source = np.asarray(source, np.int32)
    source_lengths = (np.full(source.shape[:1], source.shape[1], np.int32)
                      if source_lengths is None else np.asarray(source_lengths, np.int32))
    source = (source, source_lengths)
  args = (state, prompts[:, :longest], lengths, source, options)
  leaves, treedef = jax.tree.flatten(args)
  avals = tuple((tuple(x.shape), x.dtype) for x in leaves)
  start = time.perf_counter()
  hits = _compiled.cache_info().hits
  program = _compiled(graphdef, static, treedef, avals)
  compile_s = 0.0 if _compiled.cache_info().hits > hits else time.perf_counter() - start
  start = time.perf_counter()
  tokens, count, scores = jax.device_get(program(*args))
  return Generated(tokens, count, scores, compile_s, time.perf_counter() - start)
