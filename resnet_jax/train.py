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
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import metrics as clu_metrics
from clu import periodic_actions
from etils import epath

from resnet_jax import augment as augment_lib
from resnet_jax import backend
from resnet_jax import checkpointing
from resnet_jax import errors
from resnet_jax import input_pipeline
from resnet_jax import models
from resnet_jax import optim
from resnet_jax import parallel
from resnet_jax import paths


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


class JsonlWriter(metric_writers.interface.MetricWriter):
  """Appends one JSON object per `write_scalars` call to a file: {'step': ..., **scalars}.

  The file may be on gs:// (epath); on resume, lines past the checkpoint are
  dropped, since the resumed run writes them again.
  """

  def __init__(self, path: epath.Path, resume_step: int | None = None,
               eval_pending: bool = False):
    self.path = path
    if resume_step is not None and path.exists():
      def kept(line: dict[str, Any]) -> bool:
        if eval_pending and line['step'] == resume_step:  # it is evaluated again
          return not any(key.startswith('eval_') for key in line)
        return line['step'] <= resume_step
      keep = [line + '\n' for line in path.read_text().splitlines()
              if line.strip() and kept(json.loads(line))]
      path.write_text(''.join(keep))
    elif path.exists():
      path.unlink()
    # epath opens gs:// files as a context manager: keep it open for the run.
    self._files = contextlib.ExitStack()
    self._file = self._files.enter_context(path.open('a'))

  def write_scalars(self, step, scalars):
    self._file.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
                     + '\n')
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._files.close()


class Preempted(Exception):
  """Training stopped early on SIGTERM after saving a checkpoint (not an error)."""


class Preemption:
  """SIGTERM (TPU VM preemption or maintenance) -> stop at the next safe point.

  Safe points are the end of each training step and the start of each
  evaluation batch, so an evaluation (50,000 ImageNet images, 10 crops) never
  holds up a preemption notice: the loop stops it and saves.
  One process: our own SIGTERM handler. Several: JAX's preemption sync manager
  (started by jax.distributed.initialize) catches the signal on any host and
  picks one safe point at which every host stops, so that they all save
  together. Every host passes the same safe points in the same order (the
  same steps and the same number of eval batches), which is what it needs.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._multihost = jax.process_count() > 1
    self._safe_points = 0

  def __enter__(self):
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self) -> bool:
    """Whether to stop here; call at every safe point, on every host alike."""
    if self._multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self._safe_points += 1
      return multihost_utils.reached_preemption_sync_point(self._safe_points)
    return self._event.is_set()


class TrainClock:
  """Wall time spent training: evaluation and checkpoint saves are left out.

  Steps run asynchronously, so a paused section first waits for the steps in
  flight (they are training time).
  """

  def __init__(self, step: int):
    self._start = time.monotonic()
    self._paused = 0.0
    self._last = (0.0, step)  # (training seconds, step) at the last reading

  @contextlib.contextmanager
  def paused(self, in_flight: Any):
    jax.block_until_ready(in_flight)
    start = time.monotonic()
    try:
      yield
    finally:
      self._paused += time.monotonic() - start

  def images_per_sec(self, step: int, batch_size: int) -> float:
    """Images per second of training since the last call."""
    seconds = time.monotonic() - self._start - self._paused
    last_seconds, last_step = self._last
    self._last = (seconds, step)
    return batch_size * (step - last_step) / max(seconds - last_seconds, 1e-9)


def save_config(config: Any, workdir: epath.Path, cpu_kernels_used: str) -> None:
  """WORKDIR/config.json: the config, and what config.cpu_kernels resolved to here."""
  if jax.process_index() == 0:
    saved = json.loads(config.to_json_best_effort())
    saved['cpu_kernels_used'] = cpu_kernels_used
    paths.write_json(workdir / 'config.json', saved)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run trains and evaluates with: data, the parallel strategy, the step count."""
  inp: input_pipeline.Input
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
  model_options = dict(config.model)
  models.check_options(model_options.pop('name'), model_options)  # fail before touching data
  if 'multi_scale' in (config.data.eval_crop, config.data.final_eval_crop) and (
      config.model.name == 'vgg19'):
    raise errors.ConfigError('Multi-scale testing needs a fully-convolutional net (a ResNet or '
                             "plain net); vgg19's classifier takes one input size.")
  parallel.check_batch_sizes(config, jax.device_count())
  input_pipeline.check_eval_crop(config.data)  # both crops now, not after the last step
  if config.data.final_eval_crop:
    input_pipeline.check_eval_crop(config.data, 'final_eval_crop')
  cpu_kernels = backend.choose_cpu_kernels(config.cpu_kernels)
  run_options = {**backend.model_defaults(config.model), **cpu_kernels.model_options}
  # One data shard per device (see input_pipeline.Input); this host reads its devices' shards.
  devices = jax.devices()
  shards = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  inp = input_pipeline.create_input(config, shards, len(devices), jax.process_index(),
                                    jax.process_count())
  logging.info('Host %d of %d trains on %s %s (data shards %s of %d) and evaluates on %s.',
               jax.process_index(), jax.process_count(), config.data.name, inp.splits.train,
               shards, len(devices),
               input_pipeline.describe_split(input_pipeline.part_of_split(
                   inp.splits.eval, jax.process_index(), jax.process_count())))
  steps_total = total_steps(config, inp.steps_per_epoch)
  schedule = optim.schedule_fn(config, inp.steps_per_epoch, steps_total)
  tx = optim.create_optimizer(config)
  input_shape = (config.data.image_size, config.data.image_size, 3)
  augment = input_pipeline.device_augment(inp.builder, config, inp.splits.train)
  strategy = parallel.create(
      config,
      lambda axis: models.create_model_from_config(config.model, inp.num_classes,
                                                   bn_axis_name=axis, **run_options),
      tx, schedule, input_shape, augment=augment)
  return Setup(inp, strategy, steps_total, cpu_kernels.description, augment)


def evaluate(strategy: parallel.Parallel, state: Any, batches: Iterable[dict[str, Any]],
             stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
  """Loss and errors over every example of an eval split (`input_pipeline.eval_batches`),
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


def create_writer(workdir: epath.Path, resume_step: int | None,
                  eval_pending: bool = False) -> metric_writers.MetricWriter:
  """TensorBoard + logging + metrics.jsonl on the first host; logging elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(str(workdir)),
      JsonlWriter(workdir / 'metrics.jsonl', resume_step, eval_pending)])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or continues training) in `workdir` (a local path or gs://...).

  Returns the last eval metrics.
  """
  workdir = paths.workdir_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = setup(config)
  inp, strategy, steps_total = run.inp, run.strategy, run.steps_total
  ckpt = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  state, step, loop = restore_or_init(strategy, ckpt, config)
  save_config(config, workdir, run.cpu_kernels_used)
  # SIGTERM stopped the evaluation of this step: it runs first (see Preemption).
  pending_eval = bool(loop.get('pending_eval'))
  writer = create_writer(workdir, step if step else None, pending_eval)
  if step == 0:
    writer.write_hparams(_flatten(config))

  if step >= steps_total and not pending_eval:
    logging.warning('%s is already trained for %d steps (config: %d); nothing to do. Raise '
                    'config.num_train_steps (or num_epochs) to train further.', workdir, step,
                    steps_total)
    ckpt.close()
    writer.close()
    return {}

  log_every = config.log_every_steps
  eval_every = every(config.eval_every_steps, inp.steps_per_epoch)
  ckpt_every = every(config.checkpoint_every_steps, inp.steps_per_epoch)
  progress = periodic_actions.ReportProgress(num_train_steps=steps_total, writer=writer,
                                             every_steps=log_every)
  hooks = [progress]
  if config.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=5,
                                          first_profile=step + 10))

  # Training metrics accumulated since the last log line; they survive preemption.
  window = loop.get('train_sums')
  window = strategy.replicate({k: np.float32(v) for k, v in window.items()}) if window else None
  eval_metrics: dict[str, float] = {}
  batches = _prefetch(input_pipeline.train_iterator(config, inp, step), strategy.put_batch,
                      config.data.prefetch)
  eval_data = input_pipeline.eval_dataset(config, inp)
  clock = TrainClock(step)
  preempted = False
  with Preemption() as preemption:
    while step < steps_total or pending_eval:
      if pending_eval:
        evaluated, resumed_eval, pending_eval = True, True, False
      else:
        state, metrics = strategy.train_step(state, next(batches))
        window = metrics if window is None else _accumulate(window, metrics)
        step += 1
        for hook in hooks:
          hook(step)
        if step % log_every == 0 or step == steps_total:
          train = _log_train(writer, strategy, window, step, ckpt)
          window = None
          writer.write_scalars(step, {'images_per_sec': clock.images_per_sec(
              step, config.batch_size)})
          state = _update_schedule(strategy, state, optim.after_train_log, config,
                                   train['train_top1_error'])
        evaluated, resumed_eval = step % eval_every == 0 or step == steps_total, False

      if evaluated:
        with clock.paused(state), progress.timed('eval'):
          step_metrics = evaluate(strategy, state,
                                  input_pipeline.eval_batches(config, inp, eval_data),
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
  ckpt.wait()
  ckpt.close()
  writer.flush()
  writer.close()
  if preempted:
    raise Preempted(f'SIGTERM: saved a checkpoint at step {step} and stopped; rerun the same '
                    'command to continue.')
  return eval_metrics


def _final_evaluation(config: Any, inp: input_pipeline.Input, strategy: parallel.Parallel,
                      state: Any, metrics: dict[str, float],
                      preemption: Preemption) -> dict[str, float] | None:
  """The last step's evaluation once more with config.data.final_eval_crop (the paper's
  ImageNet protocol reports 10-crop error), as eval_<crop>_* metrics; None if stopped."""
  crop = config.data.final_eval_crop
  final_config = config.copy_and_resolve_references()
  final_config.data.eval_crop = crop
  dataset = input_pipeline.eval_dataset(final_config, inp)
  final = evaluate(strategy, state, input_pipeline.eval_batches(final_config, inp, dataset),
                   stop=preemption.reached)
  if final is None:
    return None
  return {**metrics, **{k.replace('eval_', f'eval_{crop}_', 1): v for k, v in final.items()}}


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
    raise errors.DivergedError(
        f'The {which} loss is {loss} at step {step}: training stopped without saving this '
        f'state. The last good checkpoint is at step {ckpt.latest_step()} in {ckpt.directory}. '
        'Lower config.optimizer.learning_rate (or add warm-up via config.schedule.warmup_length) '
        'and rerun the same command: training continues from that checkpoint.')


def _flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return out
