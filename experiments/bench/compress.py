"""Compression of a bytes_lm model: one size / speed / quality table (issue 16).

The model is configs/bytes_lm.py's default (2 layers, d_model 128, 4 heads, d_ff 512, dense
attention, 2000 steps of 16 x 64 bytes of the Python standard library's source), trained into
<runs>/fp32. From it:
- post-training quantization (`./launch.sh compress --method=bf16|int8|w8a8|int4|mixed`), the
  per-layer int8 sensitivity, and int4 after --retrain_steps of quantization-aware training
  (`--config.qat.method=int4` from the fp32 checkpoint);
- distillation: a student of d_model 64 (d_ff 256) trained for the same 2000 steps with the fp32
  model as its teacher (`configs/bytes_lm.py:d_model=64,distill=<runs>/fp32`, T = 2, alpha =
  0.5), against the same student without a teacher, seeds 0 and 1;
- magnitude pruning (global) at 50% and 80%, 2:4 sparsity, and structured pruning (25% of the
  heads, 50% of the feed-forward neurons), each one-shot (`compress`) and retrained for
  --retrain_steps with the mask held (a training run from the fp32 checkpoint with the `prune`
  settings, peak learning rate --retrain_lr after 10% warmup, cosine; structured: from the
  shrunk checkpoint); beside them the fp32 model fine-tuned the same way (the control for "with
  retraining").
Training runs and compressions go to --runs, each with the command that made it
(bench_command.json); one made by the same command is reused, --fresh redoes them all.

Columns: parameter bytes as stored; eval bits per byte on the valid split (the run's eval.steps
batches, the same bytes for every row); the relative change against fp32; one train step
(batch 16 x 64, forward + backward + update, jitted, median of --repeats after a warm-up; the
distilled student's step includes its teacher's forward); one decode step (batch 1, jitted
lax.scan of --decode_steps decode_step calls after a 16-byte prefill, the program's median time
over --repeats / 4 calls (at least 3, the prefill included) / the steps). Then the fp32 model's
decoding cache of 4096 positions in float32 and int8: bytes and decode time.

Command:
  ./launch.sh bench compress [--runs=runs/compress] [--out=experiments/results/compression]
Writes <out>.md, <out>.json (the rows) and <out>_sensitivity_int8.json (the compress command's
per-layer report).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import benchlib
from efflong.compress import prune, quantize
from efflong.infer import generate
from efflong.nn import kv_cache
from efflong.train import sharding, trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
_RUNS = flags.DEFINE_string('runs', 'runs/compress', 'Where the runs and compressions go.')
_OUT = flags.DEFINE_string('out', None, 'Write <out>.md and <out>.json.')
_FRESH = flags.DEFINE_bool('fresh', False, 'Redo runs and compressions already in --runs.')
_RETRAIN = flags.DEFINE_integer('retrain_steps', 500, 'Steps of retraining after pruning.')
_RETRAIN_LR = flags.DEFINE_float('retrain_lr', 1e-3, 'Peak learning rate of the retraining.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per measurement.')
_DECODE_STEPS = flags.DEFINE_integer('decode_steps', 32, 'Decode steps per timed call.')

CONFIG = 'configs/bytes_lm.py'
KV_MAX_LEN = 4096  # the decoding cache's positions in the KV cache rows
STUDENT = 'd_model=64'
QUANT = ('bf16', 'int8', 'w8a8', 'int4', 'mixed')
PRUNED = {  # name: (compress flags, training overrides that hold the same mask)
    'prune50': (['--method=prune', '--sparsity=0.5'],
                ['--config.prune.method=magnitude', '--config.prune.sparsity=0.5']),
    'prune80': (['--method=prune', '--sparsity=0.8'],
                ['--config.prune.method=magnitude', '--config.prune.sparsity=0.8']),
    'nm24': (['--method=nm', '--n=2', '--m=4'], ['--config.prune.method=nm']),
    'structured': (['--method=structured', '--heads=0.25', '--ff=0.5'], []),
}


def _run(args: list[str], done: pathlib.Path) -> None:
  """Runs `python args` in the repository unless `done` exists beside a record of the same
  command (bench_command.json); a directory made by another command is redone with --fresh,
  refused without."""
  record = done.parent / 'bench_command.json'
  if done.exists() and not _FRESH.value:
    if record.exists() and json.loads(record.read_text()) == args:
      return
    sys.exit(f'{done.parent} was made by another command than {args}; rerun with --fresh or '
             'remove it.')
  shutil.rmtree(done.parent, ignore_errors=True)
  print('$', ' '.join(args), file=sys.stderr, flush=True)
  subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
  record.write_text(json.dumps(args))


def train(name: str, arg: str = '', overrides: tuple[str, ...] = ()) -> pathlib.Path:
  """A training run of configs/bytes_lm.py:arg with overrides into <runs>/name."""
  workdir = pathlib.Path(_RUNS.value) / name
  _run(['-m', 'efflong.main', f'--config={CONFIG}' + (f':{arg}' if arg else ''),
        f'--workdir={workdir}', *overrides], workdir / 'done.json')
  return workdir


def compress(name: str, source: pathlib.Path, flags_: list[str]) -> pathlib.Path:
  """`compress` of source into <runs>/name."""
  out = pathlib.Path(_RUNS.value) / name
  report = 'sensitivity.json' if '--method=sensitivity' in flags_ else 'compress.json'
  _run(['-m', 'efflong.compress.cli', f'--workdir={source}', f'--out={out}', *flags_],
       out / report)
  return out


def retrain_overrides(init_from: pathlib.Path) -> list[str]:
  steps = _RETRAIN.value
  return [f'--config.train.init_from={init_from}', f'--config.train.steps={steps}',
          f'--config.train.warmup_steps={steps // 10}',
          f'--config.train.learning_rate={_RETRAIN_LR.value}',
          f'--config.train.eval_every={steps}', f'--config.train.checkpoint_every={steps}']


def eval_bpb(workdir: pathlib.Path) -> float:
  """The run's final eval bits per byte: compress.json's 'after', else done.json."""
  report = workdir / 'compress.json'
  if report.exists():
    return json.loads(report.read_text())['after']['eval/bits_per_byte']
  return json.loads((workdir / 'done.json').read_text())['eval/bits_per_byte']


def median_ms(call, repeats: int) -> float:
  jax.block_until_ready(call())  # warm-up (and compilation)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def train_step_ms(workdir: pathlib.Path) -> float:
  """One train step of the run's config (its distill and prune settings included), ms."""
  config = generate.load_config(str(workdir))
  config.train.init_from = ''  # the step's cost does not depend on the starting weights
  run = trainer.setup(config, jax.devices()[:1])
  batch = sharding.global_batch(next(iter(run.task.train_dataset(0, 1))), run.batch_sharding)
  box = [run.init()]
  teacher = () if run.teacher is None else (run.teacher,)

  def step():
    box[0], metrics, _ = run.train_step(box[0], batch, *teacher)
    return metrics

  return median_ms(step, _REPEATS.value)


def decode_ms(workdir: pathlib.Path, kv_dtype: str = 'float', max_len: int = 0) -> float:
  """Per-token decode time of the run's model, ms: batch 1, a 16-byte prefill then
  --decode_steps greedy steps in one program, its time (prefill included) / the steps; the cache
  holds max_len positions (0: just those) in kv_dtype."""
  model, _ = generate.load_model(str(workdir))
  graphdef, state = nnx.split(model)
  n, prompt = _DECODE_STEPS.value, 16
  max_len = max_len or prompt + n

  @jax.jit
  def decode(state, tokens):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(1, max_len, kv_dtype=kv_dtype)
    logits, cache = model.prefill({'inputs': tokens}, cache)

    def body(carry, _):
      cache, token = carry
      logits, cache = model.decode_step(token, cache)
      return (cache, logits.argmax(-1).astype(jnp.int32)), None

    (cache, token), _ = jax.lax.scan(body, (cache, logits[:, -1].argmax(-1).astype(jnp.int32)),
                                     None, length=n)
    return token

  tokens = jnp.asarray(np.arange(prompt, dtype=np.int32)[None] + 97)
  return median_ms(lambda: decode(state, tokens), max(3, _REPEATS.value // 4)) / n


def param_bytes(workdir: pathlib.Path) -> tuple[int, int | None]:
  """(parameter bytes as stored, the sparse storage estimate of a pruned model or None): N:M
  values plus their indices, or the nonzero values plus a bitmask (prune.sparsity_report)."""
  report = workdir / 'compress.json'
  if report.exists():
    saved = json.loads(report.read_text())
    sparse = saved.get('sparsity', {}) if saved['method'] in ('prune', 'nm') else {}
    return saved['param_bytes_after'], sparse.get('nm_bytes') or sparse.get('bitmask_bytes')
  model, _ = generate.load_model(str(workdir))
  sparse = None
  if generate.load_config(str(workdir)).prune.method != 'none':
    sparse = prune.sparsity_report(nnx.state(model, nnx.Param))
    sparse = sparse['nm_bytes'] or sparse['bitmask_bytes']
  return quantize.param_bytes(model), sparse


def main(argv: list[str]) -> None:
  del argv
  fp32 = train('fp32')
  rows: list[dict[str, Any]] = []

  def row(name: str, workdir: pathlib.Path, group: str, how: str, *, step: bool = True,
          decode: bool = True) -> None:
    print(f'measuring {name}...', file=sys.stderr, flush=True)
    rows.append({'name': name, 'group': group, 'how': how,
                 'workdir': os.path.relpath(workdir, ROOT),
                 **dict(zip(('param_bytes', 'sparse_bytes'), param_bytes(workdir))),
                 'bits_per_byte': eval_bpb(workdir),
                 'train_step_ms': train_step_ms(workdir) if step else None,
                 'decode_ms': decode_ms(workdir) if decode else None})

  row('fp32', fp32, 'baseline', f'`{CONFIG}` 2000 steps')
  for method in QUANT:
    row(method, compress(method, fp32, [f'--method={method}']), 'post-training quantization',
        f'compress --method={method}', step=False)
  qat = train('qat_int4', overrides=(*retrain_overrides(fp32), '--config.qat.method=int4'))
  row('QAT int4', compress('qat_int4_ptq', qat, ['--method=int4']), 'post-training quantization',
      f'{_RETRAIN.value} steps of int4 QAT from fp32, then compress --method=int4')
  sensitivity = compress('sensitivity_int8', fp32, ['--method=sensitivity', '--quant=int8'])
  for seed in (0, 1):
    plain = train(f'student_s{seed}', STUDENT, (f'--config.seed={seed}',))
    row(f'student s{seed}', plain, 'distillation', f'`{STUDENT}` seed {seed}, no teacher')
    kd = train(f'student_kd_s{seed}', f'{STUDENT},distill={fp32}', (f'--config.seed={seed}',))
    row(f'student KD s{seed}', kd, 'distillation', f'`{STUDENT},distill=fp32` seed {seed}')
  control = train('fp32_finetune', overrides=tuple(retrain_overrides(fp32)))
  row('fp32 + fine-tune', control, 'pruning', f'{_RETRAIN.value} more steps, no pruning')
  for name, (compress_flags, prune_overrides) in PRUNED.items():
    oneshot = compress(name, fp32, compress_flags)
    row(f'{name} one-shot', oneshot, 'pruning', 'compress ' + ' '.join(compress_flags),
        step=name == 'structured')
    source = oneshot if name == 'structured' else fp32
    resized = []
    if name == 'structured':
      shrunk = generate.load_config(str(oneshot)).model
      resized = [f'--config.model.num_heads={shrunk.num_heads}',
                 f'--config.model.head_dim={shrunk.head_dim}', f'--config.model.d_ff={shrunk.d_ff}']
    retrained = train(f'{name}_retrain', overrides=(*retrain_overrides(source), *prune_overrides,
                                                   *resized))
    held = 'from the shrunk model' if name == 'structured' else 'mask held'
    row(f'{name} + retrain', retrained, 'pruning', f'{_RETRAIN.value} steps, {held}',
        decode=False)
  kv = [kv_row(fp32, kv_dtype) for kv_dtype in kv_cache.KV_DTYPES]
  layers = sensitivity / 'sensitivity.json'
  benchlib.emit(_OUT.value, report(rows, json.loads(layers.read_text()), kv), rows + kv)
  if _OUT.value:  # the sensitivity table's raw output beside <out>.json
    shutil.copy(layers, f'{_OUT.value}_sensitivity_int8.json')


def kv_row(workdir: pathlib.Path, kv_dtype: str) -> dict[str, Any]:
  """The fp32 model's decoding cache for KV_MAX_LEN positions in kv_dtype: its bytes and the
  per-token decode time with it."""
  model, _ = generate.load_model(str(workdir))
  cache = jax.eval_shape(lambda: model.init_cache(1, KV_MAX_LEN, kv_dtype=kv_dtype))
  return {'name': f'kv cache {kv_dtype}', 'group': 'kv cache', 'cache_bytes':
          kv_cache.kv_bytes(cache), 'decode_ms': decode_ms(workdir, kv_dtype, KV_MAX_LEN)}


def report(rows: list[dict[str, Any]], sensitivity: dict[str, Any],
           kv: list[dict[str, Any]]) -> list[str]:
  """The markdown lines: the table, the goals, the KV cache, the sensitivity."""
  base = next(r for r in rows if r['name'] == 'fp32')
  by = {r['name']: r for r in rows}
  rel = lambda r: r['bits_per_byte'] / base['bits_per_byte'] - 1
  ctrl = lambda r: r['bits_per_byte'] / by['fp32 + fine-tune']['bits_per_byte'] - 1
  ms = lambda v: '—' if v is None else f'{v:.3g}'
  lines = ['## Compression of the bytes_lm model (2 layers, d_model 128, dense)', '',
           *benchlib.header(f'{jax.default_backend()}: {jax.devices()[0].device_kind}'), '',
           'Parameter bytes as stored (a pruned model stores its zeros: dense); sparse: what a '
           'sparse format would store (N:M: the kept values and 2-bit indices; else the nonzero '
           'values and a bitmask).', '',
           '| row | how | parameter bytes | sparse bytes | eval bits/byte | vs fp32 | '
           'train step ms | decode ms/token |', '|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    sparse = '—' if r['sparse_bytes'] is None else f'{r["sparse_bytes"]:,}'
    lines.append(f'| {r["name"]} | {r["how"]} | {r["param_bytes"]:,} | {sparse} | '
                 f'{r["bits_per_byte"]:.4f} | {rel(r):+.2%} | {ms(r["train_step_ms"])} | '
                 f'{ms(r["decode_ms"])} |')
  goal = lambda ok: 'met' if ok else 'NOT met'
  kd = [(by[f'student KD s{s}'], by[f'student s{s}']) for s in (0, 1)]
  lines += ['', '### Goals', '',
            f'- int8 weight-only within 1% relative bits/byte of fp32: {rel(by["int8"]):+.2%} '
            f'({goal(abs(rel(by["int8"])) <= 0.01)})',
            '- the KD student better than the student without KD on both seeds: ' + ', '.join(
                f'seed {s}: {a["bits_per_byte"]:.4f} vs {b["bits_per_byte"]:.4f}'
                for s, (a, b) in enumerate(kd)) +
            f' ({goal(all(a["bits_per_byte"] < b["bits_per_byte"] for a, b in kd))})',
            f'- 50% pruning + retraining within 2% relative of the unpruned model: '
            f'{rel(by["prune50 + retrain"]):+.2%} against fp32 '
            f'({goal(rel(by["prune50 + retrain"]) <= 0.02)}); against fp32 fine-tuned for the '
            f'same steps (the control): {ctrl(by["prune50 + retrain"]):+.2%} '
            f'({goal(ctrl(by["prune50 + retrain"]) <= 0.02)})',
            f'- structured pruning faster per train step than unpruned (same run): '
            f'{by["structured one-shot"]["train_step_ms"]:.3g} vs {base["train_step_ms"]:.3g} ms '
            f'({goal(by["structured one-shot"]["train_step_ms"] < base["train_step_ms"])})',
            '', '### Reading the table', '',
            '- Times: one 2-core CPU, the rows measured one after another (median of '
            f'{_REPEATS.value} steps each); steps of a model this small vary by tens of percent '
            'between rows, so compare sizes and bits per byte first.',
            '- Quantized rows decode no faster here: qwix stores int8 / int4 kernels with their '
            'scales and dequantizes them at each matmul on the CPU; what they save is memory.',
            f'- Retraining ({_RETRAIN.value} steps at peak learning rate {_RETRAIN_LR.value:g}) '
            'moves the unpruned model too: compare the retrained rows (and QAT, which is one) '
            'with the `fp32 + fine-tune` control as well as with fp32.',
            '', f'### The decoding cache in int8 (fp32 model, cache of {KV_MAX_LEN} positions, '
            'batch 1)', '',
            'Keys and values int8 with a bfloat16 scale per (position, kv head); each step '
            'dequantizes the cache around the attention family\'s step (efflong/nn/kv_cache.py).',
            '', '| cache | bytes | decode ms/token |', '|---|---:|---:|',
            *[f'| {r["name"].removeprefix("kv cache ")} | {r["cache_bytes"]:,} | '
              f'{r["decode_ms"]:.3g} |' for r in kv],
            '', '### int8 sensitivity per layer (one kernel quantized at a time)', '',
            '| kernel | eval loss change (nats) |', '|---|---:|']
  lines += [f'| {r["path"]} | {r["loss_delta"]:+.5f} |' for r in sensitivity['layers']]
  return lines


if __name__ == '__main__':
  app.run(main)
