"""Cached decoding per attention family: per-token latency and cache size against context length.

For every family in efflong.attention.names(decode=True), a small LM (configs/bytes_lm.py at
--layers, --d_model, 4 heads, d_ff 4 x d_model, float32, random weights: speed only) decodes at
each context C of --contexts with batch sizes --batches:
- per-token latency: model.decode_step in a jitted lax.scan of --steps tokens (the cache donated
  and fed back, so it is updated in place), compiled ahead, the fastest of 2 to --repeats calls
  (the least disturbed by other processes), divided by --steps. The cache is not filled by a
  prefill (a dense prefill of 64K tokens does not fit this machine): it is init_cache(B, C + the
  steps) with every 'length' leaf set to C, so each step attends to what C cached positions
  would give it. The contents are zeros; no family's work depends on them (static shapes, index
  gathers).
- cache bytes: the cache pytree of init_cache(B, C), summed over its leaves.
- recomputation (contexts --recompute, batch 1): one teacher-forced forward over C tokens, what
  decoding without a cache costs per token; speed-up = its time / the cached per-token time.
Family hyper-parameters are fixed across contexts (`FAMILY_KW`), so a family whose state does
not grow with C shows flat time and bytes. Transformer-XL: segment length and mem_len
--xl_segment (its cache holds mem_len + segment positions).

With --duplication=<workdir> (default: runs/duplication if it has a checkpoint), also the
duplication task solved by greedy decoding on that run's eval examples against its
teacher-forced sequence accuracy (efflong.infer.generate.duplication_by_decoding).

Command:
  ./launch.sh bench decode [--families=dense,local] [--contexts=1024,4096,16384,65536]
      [--batches=1,8] [--recompute=1024,4096] [--out=experiments/results/decode_cpu]
Each family runs in a fresh subprocess (a failure or timeout becomes its row's status).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx

import benchlib
from efflong import attention
from efflong import config as config_lib
from efflong import models

ROOT = pathlib.Path(__file__).resolve().parents[2]
_FAMILIES = flags.DEFINE_list('families', None, 'Families (default: attention.names(decode=True)).')
_CONTEXTS = flags.DEFINE_list('contexts', ['1024', '4096', '16384', '65536'], 'Contexts C.')
_BATCHES = flags.DEFINE_list('batches', ['1', '8'], 'Batch sizes.')
_RECOMPUTE = flags.DEFINE_list('recompute', ['1024', '4096'],
                               'Contexts at which a full forward (no cache) is timed, batch 1.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Decode steps per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Most timed calls (at least 2; more while they '
                               'take under 2 s in all).')
_LAYERS = flags.DEFINE_integer('layers', 2, 'Layers.')
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Width (4 heads, d_ff 4 x d_model).')
_XL_SEGMENT = flags.DEFINE_integer('xl_segment', 512, 'Transformer-XL segment length = mem_len.')
_TIMEOUT_S = flags.DEFINE_integer('timeout_s', 400, 'Seconds per family subprocess.')
_DUPLICATION = flags.DEFINE_string('duplication', None, 'A duplication run to decode (default: '
                                   'runs/duplication if it has a checkpoint; "" for none).')
_OUT = flags.DEFINE_string('out', None, 'Write <out>.md and <out>.json.')
_ONE = flags.DEFINE_string('one', None, 'Internal: measure one family (or "duplication:<dir>") '
                           'in this process.')

# Hyper-parameters independent of the context: the state of local, longformer, linear, performer
# and xl cannot grow with C.
FAMILY_KW = {
    'dense': {},
    'local': dict(window=256),
    'longformer': dict(window=256, global_tokens=1),
    'strided': dict(stride=256),
    'fixed': dict(block=256, summary=8),
    'bigbird': dict(block=64, window=1, random_blocks=2, global_tokens=1),
    'linear': dict(chunk=64),
    'performer': dict(chunk=64, nb_features=128),
    'lsh': dict(n_hashes=2, bucket_size=64),
    'xl': {},
}
_MIB = 2**20


def make_config(name: str, max_len: int) -> ml_collections.ConfigDict:
  """configs/bytes_lm.py with family `name` at this benchmark's size, for contexts up to max_len."""
  xl = name == 'xl'
  seq_len = _XL_SEGMENT.value if xl else max_len
  arg = f'attention={name},seq_len={seq_len}' + (f',mem_len={seq_len}' if xl else '')
  c = config_lib.load_module(str(ROOT / 'configs' / 'bytes_lm.py')).get_config(arg)
  c.model.update(num_layers=_LAYERS.value, d_model=_D_MODEL.value, num_heads=4,
                 d_ff=4 * _D_MODEL.value, dtype='float32', dropout_rate=0.0)
  c.model.attention_kw.update(FAMILY_KW.get(name, {}))
  return c


def nbytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def best_seconds(call) -> float:
  """The least seconds of calls of call() (compiled already): at least 2, then more up to
  --repeats while they take under 2 s in all; the least is the least disturbed by other
  processes on a shared machine."""
  times = []
  while len(times) < 2 or (len(times) < _REPEATS.value and sum(times) < 2.0):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return min(times)


def measure(name: str) -> dict[str, Any]:
  """The family's rows: per (batch, context) ms/token and cache MiB; recompute ms/token."""
  contexts = [int(c) for c in _CONTEXTS.value]
  steps = _STEPS.value
  room = steps * (_REPEATS.value + 1)  # positions the timed calls add after C
  config = make_config(name, max(contexts) + room)
  model = models.build(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)({'inputs': tokens})[:, -1]

  def decode(cache, state, tokens):
    """steps decode steps from cache: (cache, last logits)."""
    model = nnx.merge(graphdef, state)
    def body(cache, _):
      logits, cache = model.decode_step(tokens, cache)
      return cache, logits
    cache, logits = jax.lax.scan(body, cache, None, length=steps)
    return cache, logits[-1]


  @functools.partial(jax.jit, static_argnums=(0, 1))
  def filled(batch, max_len, c):
    """An empty cache for max_len positions whose every 'length' says C are cached."""
    is_length = lambda path: getattr(path[-1], 'key', None) == 'length'
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, c) if is_length(path) else x,
        model.init_cache(batch, max_len))

  rows = []
  for batch in (int(b) for b in _BATCHES.value):
    tokens = jnp.ones((batch,), jnp.int32)
    for c in contexts:
      row = {'family': name, 'batch': batch, 'context': c}
      print(f'{name} B={batch} C={c}...', file=sys.stderr, flush=True)
      row['cache_mib'] = nbytes(jax.eval_shape(lambda b=batch, c=c: model.init_cache(b, c))) / _MIB
      box = [filled(batch, c + room, c)]
      compiled = jax.jit(decode, donate_argnums=0).lower(box[0], state, tokens).compile()

      def step_calls(box=box, compiled=compiled, tokens=tokens):
        box[0], logits = compiled(box[0], state, tokens)  # the cache goes on from where it was
        return logits

      row['ms_per_token'] = best_seconds(step_calls) / steps * 1e3
      del box[0]
      if batch == 1 and str(c) in _RECOMPUTE.value:
        prefix = jnp.ones((1, c), jnp.int32)
        full = forward.lower(state, prefix).compile()
        row['recompute_ms_per_token'] = best_seconds(lambda p=prefix: full(state, p)) * 1e3
      rows.append(row)
  device = f'{jax.default_backend()}: {jax.devices()[0].device_kind}'
  return {'family': name, 'status': 'ok', 'rows': rows, 'device': device,
          'hyper': dict(config.model.attention_kw), 'mem_len': config.model.mem_len}


def duplication(workdir: str) -> dict[str, Any]:
  from efflong.infer import generate  # pylint: disable=g-import-not-at-top (child only)
  return {'family': 'duplication', 'status': 'ok', 'workdir': workdir,
          **generate.duplication_by_decoding(workdir)}


def _default_duplication_run() -> str:
  run = ROOT / 'runs' / 'duplication'
  return str(run) if (run / 'checkpoints').is_dir() and (run / 'done.json').is_file() else ''


def report(results: list[dict[str, Any]], missing: list[str]) -> list[str]:
  """The markdown lines of the report."""
  ok = [r for r in results if r['status'] == 'ok' and 'rows' in r]
  rows = [row for r in ok for row in r['rows']]
  contexts = [int(c) for c in _CONTEXTS.value]
  first, last = contexts[0], contexts[-1]
  k = lambda c: f'{c // 1024}K' if c % 1024 == 0 else str(c)
  lines = [f'## Cached decoding per family: {_LAYERS.value} layers, d_model {_D_MODEL.value}, '
           '4 heads, float32\n',
           *benchlib.header(ok[0]['device'] if ok else 'unknown (no family measured)'),
           f'- timing: {_STEPS.value} decode steps per jitted scan (cache donated), compiled ahead, '
           f'fastest of 2 to {_REPEATS.value} calls (more while under 2 s in all); ms/token = call time / steps (all rows of '
           'the batch decode together)',
           '- the cache is NOT filled by a prefill: init_cache(B, C + steps) with every `length` '
           'set to C (zeros as contents; a dense prefill of 64K does not fit this machine); the '
           'work per step depends only on the shapes and the length',
           '- hyper-parameters: ' + '; '.join(
               f'{r["family"]} {r["hyper"]}' + (f' mem_len {r["mem_len"]}' if r['mem_len'] else '')
               for r in ok)]
  if missing:
    lines.append(f'- not measured: {"; ".join(missing)}')
  for r in results:
    if r['status'] != 'ok':
      lines.append(f'- {r["family"]}: {r["status"]}')
  lines += ['', '### Per-token latency (ms) and cache size (MiB)', '',
            '| family | B | ' + ' | '.join(f'ms @{k(c)}' for c in contexts) +
            f' | ms {k(last)}/{k(first)} | ' + ' | '.join(f'MiB @{k(c)}' for c in contexts) + ' |',
            '|---|---:|' + '---:|' * (2 * len(contexts) + 1)]
  for family in dict.fromkeys(row['family'] for row in rows):
    for batch in dict.fromkeys(row['batch'] for row in rows):
      own = {row['context']: row for row in rows if row['family'] == family and
             row['batch'] == batch}
      ratio = own[last]['ms_per_token'] / own[first]['ms_per_token']
      lines.append(f'| {family} | {batch} | ' +
                   ' | '.join(f'{own[c]["ms_per_token"]:.3g}' for c in contexts) +
                   f' | {ratio:.2f} | ' +
                   ' | '.join(f'{own[c]["cache_mib"]:.4g}' for c in contexts) + ' |')
  recompute = [row for row in rows if 'recompute_ms_per_token' in row]
  if recompute:
    lines += ['', '### Cached decoding vs recomputing the prefix (batch 1)', '',
              'Recompute: one forward over the C-token prefix per new token (no cache).', '',
              '| family | C | cached ms/token | recompute ms/token | speed-up |',
              '|---|---:|---:|---:|---:|']
    for row in recompute:
      lines.append(f'| {row["family"]} | {k(row["context"])} | {row["ms_per_token"]:.3g} | '
                   f'{row["recompute_ms_per_token"]:.3g} | '
                   f'{row["recompute_ms_per_token"] / row["ms_per_token"]:.0f}x |')
  lines += ['', '### Goals', '']
  for family in ('local', 'linear', 'performer'):
    own = [row for row in rows if row['family'] == family]
    if not own:
      lines.append(f'- {family}: not measured')
      continue
    for batch in dict.fromkeys(row['batch'] for row in own):
      at = {row['context']: row for row in own if row['batch'] == batch}
      ratio = at[last]['ms_per_token'] / at[first]['ms_per_token']
      flat = at[last]['cache_mib'] == at[first]['cache_mib']
      lines.append(f'- {family} B={batch}: time({k(last)})/time({k(first)}) = {ratio:.2f} '
                   f'(goal <= 1.3: {"met" if ratio <= 1.3 else "NOT met"}); cache '
                   f'{"flat" if flat else "NOT flat"} ({at[first]["cache_mib"]:.4g} -> '
                   f'{at[last]["cache_mib"]:.4g} MiB)')
  dense = [row for row in recompute if row['family'] == 'dense' and row['context'] == 4096]
  for row in dense:
    speedup = row['recompute_ms_per_token'] / row['ms_per_token']
    lines.append(f'- dense at 4K: cached {speedup:.0f}x faster than recomputation (goal >= 50x: '
                 f'{"met" if speedup >= 50 else "NOT met"})')
  dup = [r for r in results if r['family'] == 'duplication']
  for r in dup:
    lines += ['', '### The duplication task solved by decoding', '']
    if r['status'] != 'ok':
      lines.append(f'- {r["workdir"]}: {r["status"]}')
      continue
    lines += [f'Run `{os.path.relpath(r["workdir"], ROOT)}` (step {r["step"]}), its '
              f'{r["examples"]} eval examples 0w0w: prompt 0w0, greedy decoding of |w| tokens '
              '(cached), against the teacher-forced sequence accuracy (the trainer\'s '
              'eval/seq_accuracy, evaluation attention settings).', '',
              '| teacher-forced seq accuracy | decoding seq accuracy | same verdict per example | '
              'decoding tokens/s |', '|---:|---:|---:|---:|',
              f'| {r["teacher_forced_seq_accuracy"]:.4f} | {r["decoding_seq_accuracy"]:.4f} | '
              f'{r["agreement"]:.4f} | {r["decoding_tokens_per_s"]:,.0f} |']
  return lines


def main(argv: list[str]) -> None:
  del argv
  if _ONE.value is not None:
    kind, _, workdir = _ONE.value.partition(':')
    print(json.dumps(duplication(workdir) if kind == 'duplication' else measure(kind)))
    return
  decoders = attention.names(decode=True)
  names = _FAMILIES.value or decoders
  missing = [f'{n} (cannot decode: {attention.get(n).decode_why or "no cache yet"})'
             for n in attention.names() if n not in decoders and not _FAMILIES.value]
  results = []
  for name in names:
    print(f'{name}...', file=sys.stderr, flush=True)
    results.append(benchlib.run_child(__file__, [*sys.argv[1:], f'--one={name}'],
                                      {'family': name}, _TIMEOUT_S.value))
  workdir = _default_duplication_run() if _DUPLICATION.value is None else _DUPLICATION.value
  if workdir:
    results.append(benchlib.run_child(__file__, [*sys.argv[1:], f'--one=duplication:{workdir}'],
                                      {'family': 'duplication', 'workdir': workdir},
                                      _TIMEOUT_S.value))
  benchlib.emit(_OUT.value, report(results, missing), results)


if __name__ == '__main__':
  app.run(main)
