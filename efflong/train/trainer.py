"""One training loop for every task: mesh, sharded state, jit'd steps, checkpoints, metrics.

Reads top to bottom: build the mesh, task, model and optimizer (and a distillation teacher); start
the state directly in its shardings (a fresh init, another run's parameters, or this run's own
checkpoint); then step, log, evaluate and checkpoint until config.train.steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from efflong import attention, errors, models, tasks
from efflong.compress import distill, prune
from efflong.train import checkpoint, optim, sharding
from efflong.train.checkpoint import Checkpoints
from efflong.train.metrics import Accumulator, Writer


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN or infinite, and train.skip_nonfinite is off."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved first."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  model_state: nnx.State  # non-trainable model variables (empty for most families)
  opt_state: optax.OptState
  memory: Any = None  # Transformer-XL's segment memory (model.mem_len > 0), carried across steps


Teacher = tuple[nnx.State, nnx.State]  # a distillation teacher's (params, model_state)


def eval_attention_kws(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{metric prefix: attention_kw} of each evaluation: 'eval' with eval.attention_kw, and
  'eval/<name>' for each eval.variants entry, each the training attention_kw updated by the
  overrides that are set (not None)."""
  overrides = {'eval': config.eval.attention_kw,
               **{f'eval/{name}': kw for name, kw in config.eval.variants.items()}}
  kws = {}
  for prefix, over in overrides.items():
    kws[prefix] = config.model.attention_kw.to_dict()
    kws[prefix].update({k: v for k, v in over.to_dict().items() if v is not None})
  return kws


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  return nnx.split(model, nnx.Param, ...)


def _micro_batches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B / n, ...]; micro-batch i takes rows i, i + n, ... so each stays spread
  over the devices that hold the batch."""
  def split(x):
    if x.shape[0] % n:
      raise errors.Error(f'train.batch_size {x.shape[0]} is not divisible by grad_accum_steps {n}.')
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _memory_shardings(abstract_memory: Any, batch_sharding: NamedSharding) -> Any:
  """A memory's rows are sharded like the batch rows they continue: hidden [L, B, M, D] on B,
  segment_ids [B, M] on B. None (no memory) stays None."""
  if abstract_memory is None:
    return None
  rows = batch_sharding.spec[0] if batch_sharding.spec else None
  mesh = batch_sharding.mesh
  return {'hidden': NamedSharding(mesh, P(None, rows)),
          'segment_ids': NamedSharding(mesh, P(rows))}


def _before_step(graphdef: nnx.GraphDef, state: TrainState, key: jax.Array) -> nnx.State:
  """The model state after the attention families' per-step hooks (e.g. feature redraws)."""
  model = nnx.merge(graphdef, state.params, state.model_state)
  attention.before_step(model, key, state.step)
  return _split(model)[2]


def make_loss_fn(config: ml_collections.ConfigDict, task: tasks.Task, graphdef: nnx.GraphDef,
                 teacher_graphdef: nnx.GraphDef | None = None):
  """(params, model_state, batch, key, memory, teacher) -> (loss, (metric sums, next memory)).

  teacher: None, or the teacher's (params, model_state) with teacher_graphdef: its outputs, without
  gradient, enter distill.distillation_loss on the positions the task scores
  (task.target_weights), and the metrics gain kd_loss; the task's own loss stays `loss`.
  """

  def loss_fn(params, model_state, batch, key, memory, teacher):
    outputs, memory = _forward(nnx.merge(graphdef, params, model_state), batch, key, memory)
    loss, metrics = task.loss_and_metrics(outputs, batch)
    if teacher is not None:
      teacher_outputs = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, *teacher)(batch))
      weights = task.target_weights(batch)
      scored = weights.shape[1]  # the first P positions of the outputs (tasks.Task)
      loss, kd_metrics = distill.distillation_loss(
          outputs[:, :scored], teacher_outputs[:, :scored], loss, weights,
          temperature=config.distill.temperature, alpha=config.distill.alpha)
      metrics = {**metrics, **kd_metrics}
    return loss, (metrics, memory)

  return loss_fn


def make_train_step(config: ml_collections.ConfigDict, task: tasks.Task,
                    tx: optax.GradientTransformation, graphdef: nnx.GraphDef,
                    teacher_graphdef: nnx.GraphDef | None = None, opt_on_device: Any = None):
  """(state, batch, teacher=None) -> (state, metric sums, {grad_norm, learning_rate, finite});
  teacher as make_loss_fn takes it. opt_on_device: the optimizer state's shardings in device
  memory, where the step moves it first (it arrives from host memory: train.offload_optimizer);
  None: it is on the device already."""
  accum = config.train.grad_accum_steps
  dropout_key = jax.random.key(config.seed + 1)
  hook_key = jax.random.key(config.seed + 2)  # The attention families' per-step draws.
  lr_schedule = optim.schedule(config.train)
  grad_fn = jax.value_and_grad(make_loss_fn(config, task, graphdef, teacher_graphdef),
                               has_aux=True)

  def train_step(state: TrainState, batch: dict, teacher: Teacher | None = None):
    key = jax.random.fold_in(dropout_key, state.step)
    state = state.replace(model_state=_before_step(graphdef, state,
                                                   jax.random.fold_in(hook_key, state.step)))
    if accum == 1:
      (loss, (metrics, memory)), grads = grad_fn(state.params, state.model_state, batch, key,
                                                 state.memory, teacher)
    else:  # no memory here (the trainer refuses mem_len > 0 with grad_accum_steps > 1)
      def body(carry, xs):
        i, micro = xs
        out = grad_fn(state.params, state.model_state, micro, jax.random.fold_in(key, i), None,
                      teacher)
        return jax.tree.map(jnp.add, carry, out), None

      micro = _micro_batches(batch, accum)
      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params,
                                                          state.model_state, first, key, None,
                                                          teacher))
      ((loss, (metrics, memory)), grads), _ = jax.lax.scan(body, zeros,
                                                           (jnp.arange(accum), micro))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    old_opt_state = (state.opt_state if opt_on_device is None else
                     jax.device_put(state.opt_state, opt_on_device))
    updates, opt_state = tx.update(grads, old_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step leaves parameters and optimizer state as they were.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    state = state.replace(step=state.step + 1, params=keep(params, state.params),
                          opt_state=keep(opt_state, old_opt_state),
                          memory=keep(memory, state.memory))
    scalars = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': lr_schedule(state.step - 1),
               'finite': finite}
    return state, metrics, scalars

  return train_step


def _forward(model: nnx.Module, batch: dict, key: jax.Array | None,
             memory: Any) -> tuple[jax.Array, Any]:
  """(outputs, the next memory); memory None: a model without one (the next memory is None)."""
  if memory is None:
    return model(batch, key=key), None
  return model(batch, key=key, memory=memory)


def make_eval_step(task: tasks.Task, graphdef: nnx.GraphDef):
  """(params, model_state, batch, memory) -> (metric sums, the next memory), with the eval-time
  model graph; memory None for a model without one."""

  def eval_step(params, model_state, batch, memory):
    outputs, memory = _forward(nnx.merge(graphdef, params, model_state), batch, None, memory)
    return task.loss_and_metrics(outputs, batch)[1], memory

  return eval_step


def check_memory(config: ml_collections.ConfigDict, task: tasks.Task) -> None:
  """Raises a one-line ValueError for a memory setting the model or the data cannot carry."""
  m, mem_len, eval_mem_len = config.model, config.model.mem_len, config.eval.mem_len
  for name, value in (('model.mem_len', mem_len), ('eval.mem_len', eval_mem_len)):
    if value is not None and (not isinstance(value, int) or value < 0):
      raise errors.Error(f'{name}={value!r} must be an int >= 0 (0: no memory).')
  if not mem_len and not eval_mem_len:
    return
  if not getattr(task, 'contiguous_rows', False):
    raise errors.Error(f'a segment memory (model.mem_len={mem_len}, eval.mem_len={eval_mem_len}) '
                       f'needs batch rows that are contiguous streams; task {config.task.name!r} '
                       "has none (e.g. task 'bytes_lm' does).")
  if m.kind != 'lm':
    raise errors.Error(f"a segment memory needs model.kind='lm'; got {m.kind!r}.")
  if not attention.get(m.attention).memory:
    raise errors.Error(f'a segment memory needs an attention family with relative positions; got '
                       f'{m.attention!r}; valid: '
                       f'{attention.names(memory=True)}.')
  if m.positions != 'none':
    raise errors.Error(f"a segment memory needs model.positions='none' (relative positions only); "
                       f'got {m.positions!r}.')
  if mem_len and config.train.grad_accum_steps > 1:
    raise errors.Error(f'model.mem_len={mem_len} needs train.grad_accum_steps=1 (each micro-batch '
                       'would need its own memory rows).')


class _Interrupt:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.signum = None
    self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def restore(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run is made of, before any data or checkpoint: used by the loop and the benchmarks."""

  mesh: jax.sharding.Mesh
  task: tasks.Task
  abstract: TrainState           # shapes and logical axes of the state
  shardings: TrainState          # NamedShardings of the state
  batch_sharding: NamedSharding
  init: Any                      # () -> TrainState, created directly in `shardings`
  init_from: Any                 # (params, model_state) -> TrainState at step 0 with those
                                 # (donated) and tx.init(params)
  train_step: Any                # (state, batch[, teacher]) -> (state, metric sums, scalars);
                                 # donates state; teacher: `teacher` below, given when it is set
  eval_steps: dict[str, Any]     # {metric prefix: (params, model_state, batch, memory) ->
                                 #  (metric sums, next memory)}
  init_eval_memory: Any          # () -> an empty eval-time memory, or None without one
  teacher: Teacher | None = None  # distillation (config.distill): the teacher's restored variables


HOST_MEMORY = 'pinned_host'


def check_host_memory(devices: Any) -> None:
  """Raises a one-line errors.Error unless every device can address host memory (HOST_MEMORY),
  where train.offload_optimizer keeps the optimizer state."""
  for device in devices:
    kinds = [m.kind for m in device.addressable_memories()]
    if HOST_MEMORY not in kinds:
      raise errors.Error(f'train.offload_optimizer=True needs {HOST_MEMORY!r} memory; the '
                         f'{device.platform} backend\'s devices have {kinds}.')


def load_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> tuple[nnx.GraphDef, Teacher]:
  """The distillation teacher of config.distill.teacher_workdir: its model graph, with its own
  evaluation's attention settings, and its latest parameters and model state, restored once onto
  mesh by the student's sharding rules.

  Raises:
    errors.Error: no teacher run there (config.json or checkpoint); a teacher distill.check refuses.
  """
  from efflong.infer import generate  # pylint: disable=g-import-not-at-top (it imports trainer)
  workdir = config.distill.teacher_workdir
  teacher_config = generate.load_config(workdir)
  distill.check(config, teacher_config)
  graphdef, params, rest = _split(generate.abstract_model(teacher_config))
  abstract = {'params': params, 'model_state': rest}
  target = checkpoint.sharded(abstract,
                              sharding.state_shardings(abstract, mesh, config.sharding_rules))
  restored, _ = checkpoint.restore_variables(workdir, target, key='distill.teacher_workdir')
  return graphdef, (restored['params'], restored['model_state'])


def setup(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Setup:
  """Builds the mesh, task, model graphs, shardings and the jit'd init / train / eval steps; with
  config.distill.teacher_workdir, restores the teacher (load_teacher)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.sharding_rules
  task = tasks.build(config)
  check_memory(config, task)
  tx = optim.make(config.train, config.prune)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  teacher_graphdef, teacher = (load_teacher(config, mesh) if config.distill.teacher_workdir else
                               (None, None))

  # Abstract model -> shardings -> state created directly in them (no single-device copy).
  build = lambda kw=None: models.build(config, attention_kw=kw, rngs=nnx.Rngs(config.seed))
  graphdef, abs_params, abs_rest = _split(nnx.eval_shape(build))
  memory = lambda batch_size, mem_len: (models.init_memory(config.model, batch_size, mem_len)
                                        if mem_len else None)
  train_memory = functools.partial(memory, config.train.batch_size, config.model.mem_len)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
                        model_state=abs_rest, opt_state=jax.eval_shape(tx.init, abs_params))
  abs_memory = jax.eval_shape(train_memory)
  shardings = sharding.state_shardings(abstract, mesh, rules).replace(
      memory=_memory_shardings(abs_memory, batch_sharding))
  abstract = abstract.replace(memory=abs_memory)
  opt_on_device = None
  if config.train.offload_optimizer:  # host memory between steps; each step moves it in and out
    check_host_memory(mesh.devices.flat)
    in_memory = lambda kind: jax.tree.map(lambda s: s.with_memory_kind(kind), shardings.opt_state)
    opt_on_device = in_memory('device')
    shardings = shardings.replace(opt_state=in_memory(HOST_MEMORY))

  def start(params: nnx.State, model_state: nnx.State) -> TrainState:
    # The optimizer state is made from these parameters (a pruning mask is computed from them),
    # and the first step starts from the weights that mask keeps.
    opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32),
                      params=prune.held_masks_applied(params, opt_state),
                      model_state=model_state, opt_state=opt_state, memory=train_memory())

  init = jax.jit(lambda: start(*_split(build())[1:]), out_shardings=shardings)
  init_from = jax.jit(start, in_shardings=(shardings.params, shardings.model_state),
                      out_shardings=shardings, donate_argnums=(0, 1))

  eval_mem_len = config.model.mem_len if config.eval.mem_len is None else config.eval.mem_len
  eval_memory = functools.partial(memory, config.eval.batch_size, eval_mem_len)
  eval_memory_shardings = _memory_shardings(jax.eval_shape(eval_memory), batch_sharding)
  init_eval_memory = jax.jit(eval_memory, out_shardings=eval_memory_shardings)
  replicated = NamedSharding(mesh, P())
  teacher_shardings = () if teacher is None else (jax.tree.map(lambda x: x.sharding, teacher),)
  # The batch's shardings are its arrays' own (sharding.global_batch: with or without a length
  # axis); the steps are traced under the mesh and rules (context parallelism reads them).
  traced = functools.partial(sharding.traced_under, mesh, rules)
  train_step = jax.jit(traced(make_train_step(config, task, tx, graphdef, teacher_graphdef,
                                              opt_on_device)),
                       in_shardings=(shardings, None, *teacher_shardings),
                       out_shardings=(shardings, replicated, replicated), donate_argnums=0)
  eval_steps = {
      prefix: jax.jit(traced(make_eval_step(task,
                                            _split(nnx.eval_shape(lambda kw=kw: build(kw)))[0])),
                      in_shardings=(shardings.params, shardings.model_state, None,
                                    eval_memory_shardings),
                      out_shardings=(replicated, eval_memory_shardings))
      for prefix, kw in eval_attention_kws(config).items()}
  return Setup(mesh, task, abstract, shardings, batch_sharding, init, init_from, train_step,
               eval_steps, init_eval_memory, teacher)


def initial_state(config: ml_collections.ConfigDict, run: Setup, ckpts: Checkpoints,
                  data_iter: grain.DatasetIterator) -> tuple[TrainState, str | None]:
  """The state a run starts from, and a line saying where from (None: a fresh init).

  This run's own latest checkpoint, with data_iter restored in place (a resume: train.init_from is
  then not read; on another number of processes the data starts afresh, Checkpoints.restore);
  else, with config.train.init_from, the latest parameters and model state of that run, restored
  directly into this run's shardings, with a fresh optimizer state made from them and step 0 (the
  data starts afresh too); else run.init().

  Raises:
    errors.Error: train.init_from names no trained run, or one whose model's shapes differ.
  """
  start, init_from = ckpts.latest_step(), config.train.init_from
  if start is not None:
    ignored = f' (train.init_from={init_from!r} is not read on a resume)' if init_from else ''
    state, note = ckpts.restore(start, run.abstract, run.shardings, data_iter)
    return state, (f'Resumed from the checkpoint at step {start} in {ckpts.directory}{note}'
                   f'{ignored}.')
  if not init_from:
    return run.init(), None
  target = checkpoint.sharded(
      {'params': run.abstract.params, 'model_state': run.abstract.model_state},
      {'params': run.shardings.params, 'model_state': run.shardings.model_state})
  restored, step = checkpoint.restore_variables(init_from, target, key='train.init_from')
  return (run.init_from(restored['params'], restored['model_state']),
          f'Started from the parameters of step {step} of {os.path.abspath(init_from)} '
          '(train.init_from), with a fresh optimizer state.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> dict[str, float]:
  """Trains config in workdir, resuming from its latest checkpoint; returns the final metrics.

  A run without a checkpoint of its own starts from train.init_from's parameters when that is set
  (a resume does not read it; initial_state); config.distill.teacher_workdir makes it a
  distillation (load_teacher, make_loss_fn).

  Raises:
    NonFiniteLossError: a non-finite loss with train.skip_nonfinite off.
    Interrupted: SIGTERM / SIGINT, after saving a checkpoint.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  cfg_t = config.train
  run = setup(config, devices)
  task, batch_sharding, train_step = run.task, run.batch_sharding, run.train_step

  pidx, pcount = jax.process_index(), jax.process_count()
  train_iter = iter(task.train_dataset(pidx, pcount))
  ckpts = Checkpoints(workdir, keep=cfg_t.keep_checkpoints)
  state, origin = initial_state(config, run, ckpts, train_iter)
  step = first_step = int(state.step)
  teacher = () if run.teacher is None else (run.teacher,)

  if pidx == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = Writer(workdir, total_steps=cfg_t.steps, initial_step=step)
  if origin:
    writer.message(origin)

  def evaluate() -> dict[str, float]:
    """The eval metrics of every evaluation (eval/..., eval/<variant>/...) on the same batches."""
    accs = {prefix: Accumulator() for prefix in run.eval_steps}
    memories = {prefix: run.init_eval_memory() for prefix in run.eval_steps}
    for local in task.eval_dataset(pidx, pcount):
      batch = sharding.global_batch(local, batch_sharding)
      for prefix, eval_step in run.eval_steps.items():
        sums, memories[prefix] = eval_step(state.params, state.model_state, batch,
                                           memories[prefix])
        accs[prefix].add(sums)
    errors.raise_pending()
    return {k: v for prefix, acc in accs.items() for k, v in acc.means(prefix).items()}

  interrupt = _Interrupt()
  pending: list[tuple[int, Any, Any]] = []  # per-step outputs not yet fetched from the device
  window, t_window, steps_window = Accumulator(), time.perf_counter(), 0
  last: dict[str, float] = {}
  tokens_per_step = 0
  try:
    while step < cfg_t.steps:
      batch = sharding.global_batch(next(train_iter), batch_sharding)
      tokens_per_step = batch['inputs'].size
      state, metrics, scalars = train_step(state, batch, *teacher)
      step += 1
      pending.append((step, metrics, scalars))
      writer.progress(step, last)

      is_first = step == first_step + 1
      boundary = (step % cfg_t.log_every == 0 or step % cfg_t.eval_every == 0
                  or step % cfg_t.checkpoint_every == 0 or step == cfg_t.steps)
      if not (is_first or boundary or interrupt.signum):
        continue
      # Fetch the pending steps in order: sums, and the first non-finite step, by name.
      fetched, pending = jax.device_get(pending), []
      errors.raise_pending()  # an input check that failed inside these steps (errors.check)
      for s, m, sc in fetched:
        if not sc['finite']:
          if not cfg_t.skip_nonfinite:
            raise NonFiniteLossError(
                f'non-finite loss at step {s} (loss={sc["loss"]}, grad_norm={sc["grad_norm"]}); '
                f'stopping. Latest checkpoint: step {ckpts.latest_step()} in {ckpts.directory}. '
                'Set --config.train.skip_nonfinite=True to skip such steps instead.')
          writer.message(f'Skipped step {s}: non-finite loss {sc["loss"]}.')
          continue
        window.add(m)
      steps_window += len(fetched)
      last_scalars = fetched[-1][2]
      if step % cfg_t.log_every == 0 or step == cfg_t.steps:
        elapsed = time.perf_counter() - t_window
        sps = steps_window / elapsed
        speed = {} if is_first else {'steps_per_sec': sps, 'tokens_per_sec': sps * tokens_per_step}
        last = {**window.means('train'), **speed,
                'train/grad_norm': float(last_scalars['grad_norm']),
                'train/learning_rate': float(last_scalars['learning_rate'])}
        writer.write(step, last)
        writer.progress(step, last)
        window, steps_window = Accumulator(), 0
      if is_first:  # The first step carries compilation: keep it out of the speed.
        jax.block_until_ready(state)
        steps_window = 0
      if step % cfg_t.eval_every == 0 or step == cfg_t.steps:
        last.update(evaluate())
        writer.write(step, {k: v for k, v in last.items() if k.startswith('eval/')})
      if step % cfg_t.checkpoint_every == 0 or step == cfg_t.steps or interrupt.signum:
        ckpts.save(step, state, train_iter)
      if steps_window == 0:  # compilation, eval and checkpoints stay out of the next speed
        t_window = time.perf_counter()
      if interrupt.signum:
        ckpts.wait()
        raise Interrupted(interrupt.signum,
                          f'Interrupted ({signal.Signals(interrupt.signum).name}) at step {step}; '
                          f'checkpoint saved in {ckpts.directory}. Run the same command (same '
                          f'--workdir) to resume.')
  finally:
    interrupt.restore()
    ckpts.wait()
    ckpts.close()
    writer.close()

  if not any(k.startswith('eval/') for k in last):  # resumed at the end: evaluate what is there
    last.update(evaluate())
  final = {'step': step, **last}
  if pidx == 0:
    with open(os.path.join(workdir, 'done.json'), 'w', encoding='utf-8') as f:
      json.dump(final, f, indent=2)
  return final
