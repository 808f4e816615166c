"""The training story, top to bottom: data, model, optimizer, state, steps, loop.

`train_and_evaluate(config, workdir)` trains, evaluates, logs (TensorBoard,
metrics.jsonl, progress) and checkpoints; rerunning it on the same workdir
continues from the newest checkpoint, exactly. SIGTERM (TPU VM preemption
and maintenance) finishes the current step, saves and returns.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from etils import epath

from resnet_jax.data import device_augment as augment_lib
from resnet_jax import backend
from resnet_jax import checkpointing
from resnet_jax import config_checks
from resnet_jax import errors
from resnet_jax import models
from resnet_jax import optim
from resnet_jax import parallel
from resnet_jax import paths
from resnet_jax import preemption as preemption_lib
from resnet_jax import run_log
from resnet_jax import workdir_lock
from resnet_jax.data import eval_stream
from resnet_jax.data import inputs as inputs_lib
from resnet_jax.data import normalization
from resnet_jax.data import train_stream


def clu_metrics_from_sums(sums: dict[str, Any]) -> clu_metrics.Collection:
  """clu metrics (averages, and the last learning rate) from the steps' sums and count."""
  fields = {name: clu_metrics.Average(total=sums[name], count=sums['count'])
            for name in ('loss', 'top1_error', 'top5_error')}
  if 'learning_rate' in sums:
    fields['learning_rate'] = clu_metrics.LastValue(value=sums['learning_rate'])
  return clu_metrics.Collection.create_collection(**fields)


def total_steps(config: Any, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def every(value: int, steps_per_epoch: int) -> int:
  """A period in steps; 0 means once per epoch."""
  return value if value > 0 else steps_per_epoch


# Kept here for callers that catch train.Preempted.
Preempted = preemption_lib.Preempted


def save_config(config: Any, workdir: epath.Path, cpu_kernels_used: str) -> None:
  """WORKDIR/config.json: the config, and what config.cpu_kernels resolved to here."""
  if jax.process_index() == 0:
    saved = json.loads(config.to_json_best_effort())
    saved['cpu_kernels_used'] = cpu_kernels_used
    paths.write_json(workdir / 'config.json', saved)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run trains and evaluates with: data, the parallel strategy, the step count."""
  inp: inputs_lib.Input
  strategy: parallel.Parallel
  steps_total: int
  cpu_kernels_used: str
  # The pipeline's uint8 images -> model inputs (the steps apply it; so may analyses).
  augment: augment_lib.DeviceAugment


def setup(config: Any) -> Setup:
  """Data, model, optimizer, schedule and parallel strategy for a config.

  The backend-dependent choices (backend.py) are made here, once, before
  anything is traced.
  """
  config_checks.validate(config, jax.device_count())  # every value, before touching data
  cpu_kernels = backend.choose_cpu_kernels(config.cpu_kernels)
  run_options = {**backend.model_defaults(config.model), **cpu_kernels.model_options}
  inp = inputs_lib.create_input(
      config.data, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      host_rows=host_rows(config.batch_size), process_index=jax.process_index(),
      process_count=jax.process_count())
  logging.info('Host %d of %d trains on rows %s of each global batch of %s %s and evaluates '
               'on its part %d of %d of %s.', jax.process_index(), jax.process_count(),
               inp.host_rows, config.data.name, inp.splits.train, jax.process_index() + 1,
               jax.process_count(), inp.splits.eval)
  steps_total = total_steps(config, inp.steps_per_epoch)
  schedule = optim.schedule_fn(config, inp.steps_per_epoch, steps_total)
  tx = optim.create_optimizer(config)
  input_shape = (config.data.image_size, config.data.image_size, 3)
  augment = normalization.device_augment(config.data, inp.builder, inp.splits.train,
                                         inputs_lib.derive_seed(config.seed, 'augment'))
  strategy = parallel.create(
      config,
      lambda axis: models.create_model_from_config(config.model, inp.num_classes,
                                                   bn_axis_name=axis, **run_options),
      tx, schedule, input_shape, augment=augment)
  return Setup(inp, strategy, steps_total, cpu_kernels.description, augment)


def host_rows(batch_size: int) -> tuple[int, int]:
  """The rows of each global batch that this host's devices hold: the batch is split over
  all devices in jax.devices() order (parallel.py), so a host's rows are contiguous."""
  devices = jax.devices()
  mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  if mine != list(range(mine[0], mine[-1] + 1)):
    raise errors.ConfigError(f'Host {jax.process_index()} holds devices {mine} of '
                             f'{len(devices)}, not a contiguous range: unsupported layout.')
  per_device = batch_size // len(devices)
  return mine[0] * per_device, (mine[-1] + 1) * per_device


def evaluate(strategy: parallel.Parallel, state: Any, batches: Iterable[dict[str, Any]],
             stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
  """Loss and errors over every example of an eval split (`eval_stream.eval_batches`),
  each counted once.

  `stop` is asked before each batch (a preemption); when it says yes the
  evaluation ends early and returns None, with at most two batches left to
  finish on the devices.
  """
  sums, in_flight = None, collections.deque()
  for batch in batches:
    if stop():
      return None
    m = strategy.eval_step(state, strategy.put_batch(batch))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    # At most two batches queued on the devices: a stop never waits for the whole split.
    in_flight.append(sums)
    if len(in_flight) > 2:
      jax.block_until_ready(in_flight.popleft())
  host = strategy.metrics_to_host(sums)
  out = {f'eval_{k}': float(v) for k, v in clu_metrics_from_sums(host).compute().items()}
  out['eval_num_examples'] = host['count']
  return out


def _prefetch(iterator: Iterator, put, size: int) -> Iterator:
  """Keeps `size` batches on their way to the devices (transfers are asynchronous)."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def restore_or_init(strategy: parallel.Parallel, ckpt: checkpointing.Checkpoints, config: Any):
  """(placed state, step, loop record): the newest good checkpoint, or a fresh state (from
  config.init_from's weights, if given)."""
  rng = jax.random.key(config.seed)
  restored = ckpt.restore_latest_good(strategy.abstract_state(rng))
  if restored is None:
    return initial_state(strategy, config), 0, {}
  step, state, loop = restored
  logging.info('Resuming from the checkpoint at step %d.', step)
  return strategy.replicate(state), step, loop


def initial_state(strategy: parallel.Parallel, config: Any, evaluating: bool = False) -> Any:
  """The placed initial state: from config.seed, with config.init_from's weights if set.

  A classifier for another number of classes is replaced by a fresh one to train
  from; evaluating it would score a random classifier, so that is an error.
  """
  state = strategy.init_state(jax.random.key(config.seed))
  if not config.init_from:
    return state
  from resnet_jax import torchvision_weights  # pylint: disable=g-import-not-at-top
  params, batch_stats = torchvision_weights.load(config.init_from, config.model)
  fresh = strategy.to_host(state)
  head = (params['head']['kernel'].shape, fresh.params['head']['kernel'].shape)
  if head[0] != head[1]:
    if evaluating:
      raise torchvision_weights.WeightsError(
          f'{config.init_from}: its classifier has {head[0][-1]} classes and '
          f'{config.data.name} {head[1][-1]}: evaluating it would score a random classifier. '
          'Train from these weights first (--mode=train with config.init_from), or evaluate '
          f'on a data set with {head[0][-1]} classes.')
    logging.info('%s: its classifier %s does not fit %s classes: replaced by a fresh one.',
                 config.init_from, head[0], head[1][-1])
    params = {**params, 'head': fresh.params['head']}
  _check_shapes(config.init_from, config.model.name,
                {'params': params, 'batch_stats': batch_stats},
                {'params': fresh.params, 'batch_stats': fresh.batch_stats})
  if config.data.normalize != 'imagenet_mean_std':
    logging.warning('%s: torchvision trained these weights on inputs normalised with '
                    "ImageNet's mean and std; this run normalises with %s (set "
                    'config.data.normalize=imagenet_mean_std to match them).', config.init_from,
                    config.data.normalize)
  logging.info('Starting from the weights in %s.', config.init_from)
  # The optimizer's state (momentum) starts at zero, as for any new run.
  return strategy.replicate(fresh.replace(params=params, batch_stats=batch_stats))


def _check_shapes(source: str, net: str, loaded: Any, expected: Any) -> None:
  """Loaded weights must have the configured net's variables and shapes (for example
  VGG-19's first dense layer depends on data.image_size)."""
  shapes = lambda tree: {jax.tree_util.keystr(path): np.shape(leaf)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = shapes(loaded), shapes(expected)
  wrong = [f'{key}: {got.get(key)} instead of {shape}' for key, shape in want.items()
           if got.get(key) != shape] + [f'{key}: not in this net' for key in got if key not in want]
  if wrong:
    from resnet_jax import torchvision_weights  # pylint: disable=g-import-not-at-top
    raise torchvision_weights.WeightsError(
        f'{source} does not fit the configured {net} (model and data settings): '
        + '; '.join(wrong[:5]) + (f' (and {len(wrong) - 5} more)' if len(wrong) > 5 else ''))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or continues training) in `workdir` (a local path or gs://...).

  Returns the last eval metrics.
  """
  workdir = paths.workdir_path(workdir)
  run = setup(config)  # every config value and the data, before the workdir is touched
  with _claim(workdir):
    ckpt = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
      changes = _check_resume_config(config, workdir, ckpt)
      state, step, loop = restore_or_init(run.strategy, ckpt, config)
      # SIGTERM stopped the evaluation of this step: it runs first (see Preemption).
      pending_eval = bool(loop.get('pending_eval'))
      # (metrics.jsonl is read, and any bad line before its last reported, before anything
      # is written)
      writer = run_log.create_writer(workdir, step if step else None, pending_eval)
      try:
        _record_config_changes(workdir, changes)
        save_config(config, workdir, run.cpu_kernels_used)
        return _train(config, workdir, run, ckpt, writer, state, step, loop, pending_eval)
      finally:
        writer.close()
    finally:
      ckpt.close()


@contextlib.contextmanager
def _claim(workdir: epath.Path) -> Iterator[None]:
  """The workdir, created if need be and locked for this run: a second run on it stops at
  once, naming this one (process 0 holds the lock; every host learns whether it got it)."""
  with contextlib.ExitStack() as stack:
    error = None
    try:
      paths.make_workdir(workdir)
      stack.enter_context(workdir_lock.hold(workdir, purpose='train',
                                            enabled=jax.process_index() == 0))
    except errors.UserError as e:
      error = e
    if parallel.any_host(error is not None):
      raise error or errors.WorkdirInUseError(
          f'{workdir}: process 0 could not claim it for this run (see its message).')
    yield


def _check_resume_config(config: Any, workdir: epath.Path,
                         ckpt: checkpointing.Checkpoints) -> dict[str, Any] | None:
  """A resumed run trains what its checkpoints were trained for: a config that changes that
  (model, data, batch size, optimizer, schedule, seed) stops with the differences unless
  config.allow_resume_changes. Returns the record of the changes (None: none)."""
  saved_path = workdir / 'config.json'
  if not ckpt.steps() or not saved_path.exists():
    return None
  harmful, harmless = config_checks.resume_changes(paths.read_json(saved_path), config)
  if harmful and not config.allow_resume_changes:
    listed = '\n  '.join(f'config.{k}: {old!r} -> {new!r}' for k, (old, new) in harmful.items())
    raise errors.ConfigError(
        f'{workdir} was trained with another config; this one changes what is trained:\n  '
        f'{listed}\nRerun with the config it was trained with (see {saved_path}), use a new '
        'workdir, or add --config.allow_resume_changes=True to go on with these changes.')
  changes = {**harmful, **harmless}
  if changes:
    log = logging.warning if harmful else logging.info
    log('Resuming %s with config changes: %s', workdir,
        '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items()))
    return {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'after_step': ckpt.latest_step(),
            'changes': {k: [old, new] for k, (old, new) in changes.items()}}
  return None


def _record_config_changes(workdir: epath.Path, record: dict[str, Any] | None) -> None:
  """WORKDIR/config_changes.jsonl: one line per resume that changed the config."""
  if record and jax.process_index() == 0:
    paths.append_line(workdir / 'config_changes.jsonl', json.dumps(record))


def _train(config: Any, workdir: epath.Path, run: Setup, ckpt: checkpointing.Checkpoints,
           writer: run_log.LoggingWriter, state: Any, step: int, loop: dict[str, Any],
           pending_eval: bool) -> dict[str, float]:
  """The training loop, from `step` (restored or 0) to the end or a preemption."""
  inp, strategy, steps_total = run.inp, run.strategy, run.steps_total
  if step == 0:
    writer.write_hparams(_flatten(config))

  if step >= steps_total and not pending_eval:
    logging.warning('%s is already trained for %d steps (config: %d); nothing to do. Raise '
                    'config.num_train_steps (or num_epochs) to train further.', workdir, step,
                    steps_total)
    return {}

  log_every = config.log_every_steps
  eval_every = every(config.eval_every_steps, inp.steps_per_epoch)
  ckpt_every = every(config.checkpoint_every_steps, inp.steps_per_epoch)
  progress = run_log.Progress(writer, steps_total, log_every, step)
  profile_steps = (step + 10, step + 15) if config.profile and jax.process_index() == 0 else None

  # Training metrics accumulated since the last log line; they survive preemption.
  window = loop.get('train_sums')
  window = strategy.replicate({k: np.float32(v) for k, v in window.items()}) if window else None
  eval_metrics: dict[str, float] = {}
  train_batches = train_stream.train_iterator(config.data, inp, seed=config.seed,
                                              start_step=step, num_steps=steps_total - step)
  batches = _prefetch(train_batches, strategy.put_batch, config.data.prefetch)
  clock = run_log.TrainClock(step)
  preempted = False
  with preemption_lib.Preemption() as preemption:  # until the last save has finished
    while step < steps_total or pending_eval:
      if pending_eval:
        evaluated, resumed_eval, pending_eval = True, True, False
      else:
        state, metrics = strategy.train_step(state, next(batches))
        window = metrics if window is None else _accumulate(window, metrics)
        step += 1
        ckpt.check_saves()  # a failed asynchronous save (a full disk) stops the run now
        progress(step)
        if profile_steps:
          _profile(profile_steps, step, workdir)
        if step % log_every == 0 or step == steps_total:
          train = _log_train(writer, strategy, window, step, ckpt)
          window = None
          writer.write_scalars(step, {'images_per_sec': clock.images_per_sec(
              step, config.batch_size)})
          state = _update_schedule(strategy, state, optim.after_train_log, config,
                                   train['train_top1_error'])
        evaluated, resumed_eval = step % eval_every == 0 or step == steps_total, False

      if evaluated:
        with clock.paused(state):
          step_metrics = evaluate(strategy, state, eval_stream.eval_batches(config.data, inp),
                                  stop=preemption.reached)
          if step_metrics is not None and step == steps_total and config.data.final_eval_crop:
            step_metrics = _final_evaluation(config, inp, strategy, state, step_metrics,
                                             preemption)
        if step_metrics is None:  # SIGTERM: save now, evaluate this state after the restart
          logging.warning('SIGTERM during the evaluation at step %d: stopped it to save.', step)
          if not resumed_eval:  # (a resumed one's checkpoint is saved already)
            with clock.paused(state):
              _save(ckpt, strategy, step, state, window, pending_eval=True)
          preempted = True
          break
        if resumed_eval and not math.isfinite(step_metrics['eval_loss']):
          # The saved state itself is diverged: restarting would evaluate it again.
          ckpt.move_aside(step, f'diverged: its evaluation (pending when SIGTERM stopped it) '
                                f'gave the loss {step_metrics["eval_loss"]}')
        _check_finite('eval', step_metrics['eval_loss'], step, ckpt)
        eval_metrics = step_metrics
        writer.write_scalars(step, eval_metrics)
        state = _update_schedule(strategy, state, optim.after_eval, config,
                                 eval_metrics['eval_top1_error'])

      preempted = preemption.reached()
      if resumed_eval:
        # This step's checkpoint exists (it was saved before its evaluation);
        # its eval metrics are added so that it can be chosen as the best.
        ckpt.set_metrics(step, eval_metrics)
      elif step % ckpt_every == 0 or step == steps_total or preempted:
        with clock.paused(state):
          _save(ckpt, strategy, step, state, window, metrics=eval_metrics if evaluated else None)
      if preempted:
        break
    train_batches.close()  # grain's workers stop and free their buffers now
    ckpt.wait()
    ckpt.close()
    writer.flush()
  if preempted:
    raise Preempted(preemption.message(step))
  return eval_metrics


def _final_evaluation(config: Any, inp: inputs_lib.Input, strategy: parallel.Parallel,
                      state: Any, metrics: dict[str, float],
                      preemption: preemption_lib.Preemption) -> dict[str, float] | None:
  """The last step's evaluation once more with config.data.final_eval_crop (the paper's
  ImageNet protocol reports 10-crop error), as eval_<crop>_* metrics; None if stopped."""
  crop = config.data.final_eval_crop
  final = evaluate(strategy, state, eval_stream.eval_batches(config.data, inp, crop=crop),
                   stop=preemption.reached)
  if final is None:
    return None
  return {**metrics, **{k.replace('eval_', f'eval_{crop}_', 1): v for k, v in final.items()}}


def _profile(steps: tuple[int, int], step: int, workdir: epath.Path) -> None:
  """A jax profiler trace of steps [first, last) into the workdir (TensorBoard's profile tab)."""
  if step == steps[0]:
    jax.profiler.start_trace(str(workdir))
  elif step == steps[1]:
    jax.profiler.stop_trace()


def _save(ckpt: checkpointing.Checkpoints, strategy: parallel.Parallel, step: int, state: Any,
          window: Any, metrics: dict[str, float] | None = None,
          pending_eval: bool = False) -> None:
  """Starts saving `state` with what the loop needs to continue exactly from here."""
  sums = strategy.metrics_to_host(window) if window is not None else None
  if sums is not None:
    _check_finite('training', sums['loss'], step, ckpt)
  loop = {'train_sums': sums}
  if pending_eval:
    loop['pending_eval'] = True
  ckpt.save(step, strategy.unreplicate(state), loop, metrics=metrics)


def _update_schedule(strategy, state, rule, config, error: float):
  """Applies a host-side learning-rate rule (warm-up end, plateau) to the state."""
  current = jax.tree.map(np.asarray, strategy.to_host(state.schedule))
  new = rule(config, current, error)
  if new is current:
    return state
  logging.info('Step %d: learning-rate state %s -> %s (error %.4f).', int(
      jax.device_get(strategy.unreplicate(state.step))), current, new, error)
  return state.replace(schedule=strategy.replicate(new))


def _accumulate(window, metrics):
  """Sums metrics over steps; the learning rate keeps its latest value."""
  out = jax.tree.map(jnp.add, window, metrics)
  out['learning_rate'] = metrics['learning_rate']
  return out


def _log_train(writer, strategy, window, step: int, ckpt) -> dict[str, float]:
  sums = strategy.metrics_to_host(window)
  _check_finite('training', sums['loss'], step, ckpt)
  values = clu_metrics_from_sums(sums).compute()
  scalars = {f'train_{k}': float(v) for k, v in values.items() if k != 'learning_rate'}
  scalars['learning_rate'] = float(values['learning_rate'])
  writer.write_scalars(step, scalars)
  return scalars


def _check_finite(which: str, loss: float, step: int, ckpt: checkpointing.Checkpoints) -> None:
  """Stops the run on a non-finite loss, before that state is saved or used for any decision."""
  if not math.isfinite(loss):
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f'The last good checkpoint is at step {last} in {ckpt.directory}' if last else
             'No checkpoint was saved before it')
    resumes = 'continues from that checkpoint' if last else 'starts again from step 0'
    raise errors.DivergedError(
        f'The {which} loss is {loss} at step {step}: training stopped without saving this '
        f'state. {where}. Lower config.optimizer.learning_rate (or add warm-up via '
        f'config.schedule.warmup_length) and rerun the same command: training {resumes}.')


def _flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return out
