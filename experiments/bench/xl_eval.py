"""Evaluation speed of Transformer-XL's cached memory against the vanilla sliding window.

Dai et al. 2019, section 3.2 and Table 9: a vanilla model evaluated at context length C recomputes
a whole window of C tokens for every token it predicts (the window slides by one); Transformer-XL
reuses the cached hidden states of earlier segments, so each token costs one position of one
segment. Both sides here are the same XL model (configs/bytes_lm.py:attention=xl at --seq_len,
random weights: speed only) at the same context C:
- XL: segments of T = --seq_len bytes with mem_len = C - T, batch 1; each token sees C - T to C
  earlier positions (its memory plus its own segment).
- vanilla: windows of C bytes, --vanilla_batch windows per call, the last position's prediction
  kept; each token sees exactly C - 1 earlier positions.
Both are jit'd once and timed after a warm-up call (wall clock, jax.block_until_ready);
tokens/s = predicted tokens / seconds, speed-up = XL tokens/s / vanilla tokens/s.

Command:
  ./launch.sh bench xl_eval [--contexts=256,512,1024,2048] [--seq_len=128] [--layers=2]
      [--d_model=256] [--xl_tokens=4096] [--vanilla_tokens=64] [--out=experiments/results/xl_eval_cpu]
  (or .venv/bin/python experiments/bench/xl_eval.py with the same flags)
Prints markdown; with --out also writes <out>.md and <out>.json.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx

import benchlib
from efflong import config as config_lib
from efflong import models

_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'bytes_lm.py'

_CONTEXTS = flags.DEFINE_list('contexts', ['256', '512', '1024', '2048'], 'Context lengths C.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'XL segment length T (C - T is the memory).')
_LAYERS = flags.DEFINE_integer('layers', 2, 'Layers.')
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Width (4 heads, d_ff 4 x d_model).')
_XL_TOKENS = flags.DEFINE_integer('xl_tokens', 4096, 'Tokens XL predicts in the timed run.')
_VANILLA_TOKENS = flags.DEFINE_integer('vanilla_tokens', 64,
                                       'Tokens the vanilla model predicts in the timed run.')
_VANILLA_BATCH = flags.DEFINE_integer('vanilla_batch', 8, 'Windows per vanilla call.')
_OUT = flags.DEFINE_string('out', None, 'Write <out>.md and <out>.json.')


def make_config(context: int) -> ml_collections.ConfigDict:
  """configs/bytes_lm.py with XL attention at this benchmark's size; task.seq_len = C."""
  c = config_lib.load_module(str(_CONFIG_FILE)).get_config(f'attention=xl,seq_len={context}')
  c.model.update(num_layers=_LAYERS.value, d_model=_D_MODEL.value, d_ff=4 * _D_MODEL.value)
  return c


def timed(fn, *args) -> tuple[float, Any]:
  """Seconds of one call of fn(*args) after a warm-up call, and its result."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def measure(context: int) -> dict[str, Any]:
  t = _SEQ_LEN.value
  if context <= t:
    raise app.UsageError(f'--contexts: {context} must exceed --seq_len={t} (memory C - T > 0).')
  config = make_config(context)
  graphdef, params = nnx.split(models.build(config, rngs=nnx.Rngs(0)))
  stream = jax.random.randint(jax.random.key(0), (1, context + _XL_TOKENS.value), 0, 256)

  @jax.jit
  def xl(params, stream):
    """Predicts the last xl_tokens bytes segment by segment, after filling the memory with the
    C - T bytes before them in one call (timed too)."""
    model = nnx.merge(graphdef, params)
    memory = models.init_memory(config.model, 1, context - t)
    _, memory = model({'inputs': stream[:, t:context]}, memory=memory)
    segments = stream[:, context:].reshape(1, -1, t).swapaxes(0, 1)  # [n, 1, T]

    def body(memory, segment):
      logits, memory = model({'inputs': segment}, memory=memory)
      return memory, logits.argmax(-1)

    return jax.lax.scan(body, memory, segments)[1]

  @jax.jit
  def vanilla(params, windows):
    """[W, C] windows -> the prediction at each window's last position."""
    return nnx.merge(graphdef, params)({'inputs': windows})[:, -1].argmax(-1)

  xl_s, _ = timed(xl, params, stream)
  n = _VANILLA_TOKENS.value
  windows = jnp.stack([stream[0, i:i + context] for i in range(n)])  # slides by one
  batch = _VANILLA_BATCH.value
  vanilla_s = 0.0
  for start in range(0, n, batch):
    seconds, _ = timed(vanilla, params, windows[start:start + batch])
    vanilla_s += seconds
  xl_tps, vanilla_tps = _XL_TOKENS.value / xl_s, n / vanilla_s
  return {'context': context, 'seq_len': t, 'mem_len': context - t, 'xl_tokens_per_s': xl_tps,
          'vanilla_tokens_per_s': vanilla_tps, 'speedup': xl_tps / vanilla_tps,
          'device': f'{jax.default_backend()}: {jax.devices()[0].device_kind}'}


def main(argv: list[str]) -> None:
  del argv
  if _XL_TOKENS.value % _SEQ_LEN.value:
    raise app.UsageError(f'--xl_tokens={_XL_TOKENS.value} must be a multiple of --seq_len.')
  rows = []
  for c in _CONTEXTS.value:
    rows.append(measure(int(c)))
    print(json.dumps(rows[-1]), flush=True)
  lines = [f'## Transformer-XL evaluation: cached memory vs vanilla sliding window, '
           f'{_LAYERS.value} layers, d_model {_D_MODEL.value}, segment T = {_SEQ_LEN.value}\n',
           *benchlib.header(rows[0]['device']),
           f'- XL: {_XL_TOKENS.value} bytes predicted, batch 1; vanilla: {_VANILLA_TOKENS.value} '
           f'bytes, {_VANILLA_BATCH.value} windows per call', '',
           '| context C | XL mem_len | XL tokens/s | vanilla tokens/s | speed-up |',
           '|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["context"]} | {r["mem_len"]} | {r["xl_tokens_per_s"]:,.0f} | '
                 f'{r["vanilla_tokens_per_s"]:,.1f} | {r["speedup"]:,.0f}x |')
  benchlib.emit(_OUT.value, lines, rows)


if __name__ == '__main__':
  app.run(main)
