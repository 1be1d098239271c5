"""The `generate` command: continue a prompt with the latest checkpoint of a training run.

  ./launch.sh generate --workdir=runs/duplication --prompt='0 5 3 7 0' [--max_new_tokens N]
      [--temperature T] [--top_k K] [--top_p P] [--beams B] [--seed S]

Reads <workdir>/config.json (written by the trainer), builds the model it describes with the
evaluation's attention settings (model.attention_kw updated by eval.attention_kw), restores only
its parameters from the latest checkpoint, encodes the prompt for the run's task (bytes_lm: the
UTF-8 bytes of the text; duplication: symbols as integers, '0 5 3 7 0'), decodes
(efflong.infer.decode) and prints the continuation (text or symbols) and the decoding speed.
Without --max_new_tokens it fills the model's length (task.seq_len).

`duplication_by_decoding` checks that a duplication run copies w by greedy decoding as well as
teacher-forced evaluation says it does.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from efflong import attention, errors, models, tasks
from efflong import config as config_lib
from efflong.compress import quantize
from efflong.infer import decode
from efflong.nn import kv_cache
from efflong.train import checkpoint, trainer



def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags, defined only when it runs (efflong.main defines --workdir too, and a
  process, such as a test session, may import both modules)."""
  return {
      'workdir': flags.DEFINE_string('workdir', None, "A training run's directory (config.json "
                                     'and checkpoints/).'),
      'prompt': flags.DEFINE_string('prompt', None, 'The prompt: text (bytes_lm) or symbols '
                                    "separated by spaces (duplication, e.g. '0 5 3 7 0')."),
      'max_new_tokens': flags.DEFINE_integer('max_new_tokens', None, 'The most tokens to '
                                             'generate (default: up to task.seq_len).'),
      'temperature': flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0: greedy.'),
      'top_k': flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens only; 0: '
                                    'all.'),
      'top_p': flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the most likely tokens '
                                  'holding this much probability, in (0, 1]; 1: all.'),
      'beams': flags.DEFINE_integer('beams', 0, 'Beam search with this many beams; 0: sampling.'),
      'seed': flags.DEFINE_integer('seed', 0, 'Sampling seed.'),
      'kv_dtype': flags.DEFINE_enum('kv_dtype', 'float', list(kv_cache.KV_DTYPES), 'The decoding '
                                    "cache's keys and values: float, or int8 with per-token "
                                    'scales (families that cache keys and values).'),
  }


class Codec(NamedTuple):
  """A task's prompt text <-> tokens."""
  encode: Callable[[str, int], list[int]]  # (prompt, vocab_size) -> tokens
  decode: Callable[[list[int]], str]


def _encode_symbols(prompt: str, vocab_size: int) -> list[int]:
  try:
    tokens = [int(s) for s in prompt.split()]
  except ValueError:
    raise errors.Error(f'--prompt={prompt!r}: the duplication task takes symbols as integers '
                       "separated by spaces, e.g. '0 5 3 7 0'.") from None
  bad = [t for t in tokens if not 0 <= t < vocab_size]
  if bad:
    raise errors.Error(f'--prompt symbols {bad} are outside the vocabulary [0, {vocab_size}).')
  return tokens


CODECS = {
    'bytes_lm': Codec(lambda prompt, _: list(prompt.encode('utf-8')),
                      lambda tokens: bytes(tokens).decode('utf-8', errors='replace')),
    'duplication': Codec(_encode_symbols, lambda tokens: ' '.join(map(str, tokens))),
}


def _tuples(x: Any) -> Any:
  """JSON lists back to the tuples the config held (e.g. longformer's dilation)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in workdir (its config.json); a section or key added to the skeleton
  (efflong.config.base) after the run was made takes its default."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise errors.Error(f'no config.json in {workdir!r}: not the workdir of a training run '
                       '(./launch.sh writes one there).')
  with open(path, encoding='utf-8') as f:
    saved = _tuples(json.load(f))
  defaults = config_lib.base(saved['task']['name']).to_dict()
  for section, values in defaults.items():
    if isinstance(values, dict) and isinstance(saved.get(section), dict):
      saved[section] = {**values, **saved[section]}
    else:
      saved.setdefault(section, values)
  return ml_collections.ConfigDict(saved)


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """The model config describes, with the evaluation's attention settings, as shapes only;
  quantized as its `compress` section says (a run the compress command wrote)."""
  attention_kw = trainer.eval_attention_kws(config)['eval']
  method = config.get('compress', {}).get('method')

  def build() -> nnx.Module:
    model = models.build(config, attention_kw=attention_kw, rngs=nnx.Rngs(config.seed))
    if method not in quantize.METHODS:
      return model
    return quantize.ptq(model, method, quantize.sample_batch(config), rules=config.compress.rules)

  return nnx.eval_shape(build)


def load_model(workdir: str,
               config: ml_collections.ConfigDict | None = None) -> tuple[nnx.Module, int]:
  """(the model of the run in workdir with its latest checkpoint's parameters, that step).

  The model is built with the evaluation's attention settings; only the parameters and the
  model's non-trainable state are read from the checkpoint (not the optimizer state).
  """
  config = load_config(workdir) if config is None else config
  graphdef, params, rest = nnx.split(abstract_model(config), nnx.Param, ...)
  restored, step = checkpoint.restore_variables(workdir, {'params': params, 'model_state': rest},
                                             key='--workdir')
  return nnx.merge(graphdef, restored['params'], restored['model_state']), step


def generate_text(workdir: str, prompt: str, *, max_new_tokens: int | None = None,
                  seed: int = 0, kv_dtype: str = 'float',
                  **options: Any) -> tuple[str, decode.Generated]:
  """(the continuation of prompt as text or symbols, the decoding result) from the run in workdir.

  max_new_tokens: None: up to task.seq_len. seed, kv_dtype and options (temperature, top_k, top_p,
  beams): as decode.generate takes them.

  Raises:
    errors.Error: no config.json or checkpoint, a task without a prompt codec, a model that is not
      a language model, a family that cannot decode, a prompt that is empty or does not fit in
      task.seq_len, or a bad option.
  """
  config = load_config(workdir)
  attention.get(config.model.attention).check_decode()
  if config.model.kind != 'lm':
    raise errors.Error(f"generate continues language models (model.kind='lm'); the run in "
                       f'{workdir!r} is {config.model.kind!r}.')
  codec = CODECS.get(config.task.name)
  if codec is None:
    raise errors.Error(f'generate has no prompt encoding for task {config.task.name!r}; it has '
                       f'{sorted(CODECS)}.')
  tokens = codec.encode(prompt, config.task.vocab_size)
  if not tokens:
    raise errors.Error('--prompt is empty: give at least one token.')
  max_len = config.task.seq_len
  if len(tokens) >= max_len:
    raise errors.Error(f'the prompt has {len(tokens)} tokens; the model takes at most '
                       f'max_len={max_len} (task.seq_len) in all, prompt and new tokens: at most '
                       f'{max_len - 1} in the prompt.')
  if max_new_tokens is None:
    max_new_tokens = max_len - len(tokens)
  decode.check_options(max_new_tokens=max_new_tokens, **options)  # before the restore
  kv_cache.check_dtype(kv_dtype)
  model, _ = load_model(workdir, config)
  out = decode.generate(model, np.asarray([tokens]), [len(tokens)], max_len=max_len,
                        max_new_tokens=max_new_tokens, seed=seed, kv_dtype=kv_dtype, **options)
  return codec.decode(out.tokens[0, :out.lengths[0]].tolist()), out


def duplication_by_decoding(workdir: str) -> dict[str, float]:
  """Sequence accuracy of a duplication run on its eval examples 0 w 0 w, twice: teacher-forced
  (the trainer's eval/seq_accuracy: every token of the second w predicted from the true prefix)
  and by greedy decoding of |w| tokens from the prompt 0 w 0 (all of w written right).

  The two agree exactly when the cached decode matches the parallel forward: greedy decoding
  writes w exactly when every teacher-forced prediction along w is right.
  """
  config = load_config(workdir)
  if config.task.name != 'duplication' or config.task.fill:
    raise errors.Error(f'duplication_by_decoding needs a run of the causal duplication task; '
                       f'{workdir!r} is {config.task.name!r} (fill={config.task.get("fill")}).')
  model, step = load_model(workdir, config)
  task = tasks.build(config)
  half = config.task.seq_len // 2
  forward = jax.jit(lambda graphdef, state, batch: nnx.merge(graphdef, state)(batch),
                    static_argnums=0)
  graphdef, state = nnx.split(model)
  decoded, forced, seconds = [], [], 0.0
  for batch in task.eval_dataset(0, 1):
    logits = forward(graphdef, state, {'inputs': batch['inputs']})
    right = (logits.argmax(-1) == batch['targets']) | (batch['weights'] == 0)
    forced.append(np.asarray(right.all(1)))
    prompts = batch['inputs'][:, :half + 1]
    out = decode.generate(model, prompts, np.full(len(prompts), half + 1),
                          max_len=config.task.seq_len, max_new_tokens=half - 1)
    decoded.append((out.tokens == batch['inputs'][:, 1:half]).all(1))
    seconds += out.run_s
  decoded, forced = np.concatenate(decoded), np.concatenate(forced)
  return {'step': step, 'examples': len(forced),
          'teacher_forced_seq_accuracy': float(forced.mean()),
          'decoding_seq_accuracy': float(decoded.mean()),
          'agreement': float((decoded == forced).mean()),  # the same verdict on an example
          'decoding_tokens_per_s': decoded.size * (half - 1) / seconds}


def main(argv: list[str], holders: dict[str, flags.FlagHolder]) -> None:
  """The command: holders are define_flags()'s, parsed."""
  if len(argv) > 1:
    sys.exit(f'efflong: unexpected arguments {argv[1:]}; flags are --name=value.')
  values = {name: holder.value for name, holder in holders.items()}
  for name in ('workdir', 'prompt'):
    if values[name] is None:
      sys.exit(f'efflong: --{name} is required.')
  logging.set_verbosity(logging.WARNING)
  try:
    text, out = generate_text(values.pop('workdir'), values.pop('prompt'), **values)
  except (errors.Error, errors.KeywordError) as e:
    if os.environ.get('EFFLONG_TRACEBACK'):
      raise
    sys.exit(f'efflong: {e} (EFFLONG_TRACEBACK=1 shows the traceback)')
  print(text)
  n = int(out.lengths[0])
  print(f'[{n} tokens in {out.run_s:.3f} s: {n / out.run_s:.1f} tokens/s, prefill included; '
        f'compiled in {out.compile_s:.1f} s]')


if __name__ == '__main__':
  _HOLDERS = define_flags()
  app.run(lambda argv: main(argv, _HOLDERS))
