"""The `compress` command: a trained run in, a compressed run out, with its evaluation.

  ./launch.sh compress --workdir=RUN --out=DIR --method=METHOD [options]

Methods:
  bf16 | int8 | w8a8 | int4 | mixed   post-training quantization (efflong.compress.quantize; mixed
                                      takes --rules='regex=precision,...', regexes matched whole
                                      against the layer paths, default: embedding and output
                                      head bf16, every other kernel int8)
  prune        magnitude pruning of the kernels to --sparsity (--scope global | layer), one-shot
  nm           N:M sparsity (--n of every --m weights along each kernel's reduction axis)
  structured   drops --heads of the attention heads and --ff of the feed-forward neurons with the
               smallest norms: smaller matrices (efflong.compress.prune.structured)
  sensitivity  no model out: quantizes one kernel at a time with --quant and writes each one's
               eval loss change to DIR/sensitivity.json (what `mixed` rules can be chosen from)

DIR becomes a run directory like a training run's: config.json (the source's, resized for
`structured`, with a `compress` section naming the method and its options), checkpoints/<step>
(parameters only) and compress.json (eval metrics before and after, parameter bytes, sparsity).
`./launch.sh generate --workdir=DIR` decodes with it; retraining a pruned model is a training
run that starts from it (`--config.train.init_from=DIR` with the same `prune` settings, so the
optimizer holds the mask).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx

from efflong import errors, tasks
from efflong.compress import prune, quantize
from efflong.infer import generate
from efflong.train.metrics import Accumulator

PRUNING = ('prune', 'nm', 'structured')
METHODS = (*quantize.METHODS, *PRUNING, 'sensitivity')


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags, defined only when it runs (as efflong.infer.generate's)."""
  return {
      'workdir': flags.DEFINE_string('workdir', None, 'The trained run to compress.'),
      'out': flags.DEFINE_string('out', None, 'The directory of the compressed run.'),
      'method': flags.DEFINE_string('method', None, f'One of {", ".join(METHODS)}.'),
      'rules': flags.DEFINE_list('rules', None, "mixed: 'path regex=precision' pairs, e.g. "
                                 "'embedder/embed=bf16,embedder/head=bf16,.*=int8' (regexes "
                                 'matched whole against the layer paths; the first match wins).'),
      'quant': flags.DEFINE_string('quant', 'int8', 'sensitivity: the precision tried per layer.'),
      'sparsity': flags.DEFINE_float('sparsity', 0.5, 'prune: the fraction of kernel weights '
                                     'set to zero, in [0, 1).'),
      'scope': flags.DEFINE_string('scope', 'global', 'prune: global | layer (one threshold, or '
                                   'one per kernel).'),
      'n': flags.DEFINE_integer('n', 2, 'nm: nonzeros per group.'),
      'm': flags.DEFINE_integer('m', 4, 'nm: group size along the reduction axis.'),
      'heads': flags.DEFINE_float('heads', 0.25, 'structured: the fraction of heads dropped.'),
      'ff': flags.DEFINE_float('ff', 0.5, 'structured: the fraction of feed-forward neurons '
                               'dropped.'),
      'eval_steps': flags.DEFINE_integer('eval_steps', None, 'Eval batches (default: the run\'s '
                                         'eval.steps).'),
  }


def evaluate(model: nnx.Module, config: ml_collections.ConfigDict) -> dict[str, float]:
  """The task's eval metrics of model on config's eval split: {'eval/<metric>': mean}."""
  task = tasks.build(config)

  @nnx.jit
  def sums(model, batch):
    return task.loss_and_metrics(model(batch), batch)[1]

  acc = Accumulator()
  for batch in task.eval_dataset(0, 1):
    acc.add(sums(model, batch))
  errors.raise_pending()
  return acc.means('eval')


def save(model: nnx.Module, config: ml_collections.ConfigDict, out: str, step: int,
         report: dict[str, Any]) -> None:
  """Writes out/config.json, out/checkpoints/<step>/state ({params, model_state}, as a training
  checkpoint holds them, so load_model and train.init_from read it) and out/compress.json."""
  out = os.path.abspath(out)
  if os.path.exists(os.path.join(out, 'checkpoints')):
    raise errors.Error(f'--out={out!r} already holds checkpoints; give a new directory.')
  os.makedirs(out, exist_ok=True)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  with ocp.CheckpointManager(os.path.join(out, 'checkpoints')) as manager:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {'params': params, 'model_state': rest})))
    manager.wait_until_finished()
  with open(os.path.join(out, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(out, 'compress.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)


def compress(workdir: str, out: str, method: str, **options: Any) -> dict[str, Any]:
  """Compresses the run in workdir into out by method (see the module docstring); returns the
  report written to out/compress.json (sensitivity: out/sensitivity.json)."""
  if method not in METHODS:
    raise errors.Error(f'unknown --method={method!r}; valid: {", ".join(METHODS)}.')
  config = generate.load_config(workdir)
  done = config.get('compress', {}).get('method')
  if done in quantize.METHODS:
    raise errors.Error(f'--workdir={workdir!r} is already quantized (compress.method={done!r}); '
                       f'give a float run, such as its source {config.compress.source!r}.')
  if options.get('eval_steps'):
    config.eval.steps = options['eval_steps']
  model, step = generate.load_model(workdir, config)
  before = evaluate(model, config)
  report: dict[str, Any] = {'source': os.path.abspath(workdir), 'step': step, 'method': method,
                            'before': before, 'param_bytes_before': quantize.param_bytes(model)}
  if method == 'sensitivity':
    rows = quantize.sensitivity(model, options['quant'], lambda m: evaluate(m, config)['eval/loss'],
                                quantize.sample_batch(config))
    report['layers'] = [{'path': path, 'loss_delta': delta} for path, delta in rows]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'sensitivity.json'), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    return report
  settings: dict[str, Any] = {'method': method, 'source': os.path.abspath(workdir)}
  if method in quantize.METHODS:
    rules = options.get('rules')
    settings['rules'] = rules
    model = quantize.ptq(model, method, quantize.sample_batch(config), rules=rules)
  else:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if method == 'structured':
      settings.update(heads=options['heads'], ff=options['ff'])
      config, params = prune.structured(config, params, heads=options['heads'], ff=options['ff'])
      graphdef = nnx.graphdef(generate.abstract_model(config))
    else:
      if method == 'prune':
        settings.update(sparsity=options['sparsity'], scope=options['scope'])
        masks = prune.magnitude_masks(params, options['sparsity'], scope=options['scope'])
      else:
        settings.update(n=options['n'], m=options['m'])
        masks = prune.nm_masks(params, n=options['n'], m=options['m'])
      params = prune.apply_masks(params, masks)
    model = nnx.merge(graphdef, params, rest)
    report['sparsity'] = prune.sparsity_report(params)
  config.compress = settings
  report.update(after=evaluate(model, config), param_bytes_after=quantize.param_bytes(model))
  save(model, config, out, step, report)
  return report


def main(argv: list[str], holders: dict[str, flags.FlagHolder]) -> None:
  """The command: holders are define_flags()'s, parsed."""
  if len(argv) > 1:
    sys.exit(f'efflong: unexpected arguments {argv[1:]}; flags are --name=value.')
  values = {name: holder.value for name, holder in holders.items()}
  for name in ('workdir', 'out', 'method'):
    if values[name] is None:
      sys.exit(f'efflong: --{name} is required.')
  logging.set_verbosity(logging.WARNING)
  try:
    report = compress(values.pop('workdir'), values.pop('out'), values.pop('method'), **values)
  except (errors.Error, errors.KeywordError) as e:
    if os.environ.get('EFFLONG_TRACEBACK'):
      raise
    sys.exit(f'efflong: {e} (EFFLONG_TRACEBACK=1 shows the traceback)')
  if 'after' not in report:
    worst = report['layers'][:3]
    print(f'Most sensitive layers ({report["method"]}): ' + ', '.join(
        f'{r["path"]} {r["loss_delta"]:+.4f}' for r in worst))
    return
  loss = lambda r: r.get('eval/bits_per_byte', r.get('eval/loss'))
  print(f'{report["method"]}: eval {loss(report["before"]):.4f} -> {loss(report["after"]):.4f}, '
        f'parameter bytes {report["param_bytes_before"]} -> {report["param_bytes_after"]}.')


if __name__ == '__main__':
  _HOLDERS = define_flags()
  app.run(lambda argv: main(argv, _HOLDERS))
