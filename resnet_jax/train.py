"""The training story, top to bottom: data, model, optimizer, state, steps, loop.

`train_and_evaluate(config, workdir)` trains, evaluates, logs (TensorBoard,
metrics.jsonl, progress) and checkpoints; rerunning it on the same workdir
continues from the newest checkpoint, exactly. SIGTERM (TPU VM preemption
and maintenance) finishes the current step, saves and returns.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from resnet_jax import assembly
from resnet_jax import checkpointing
from resnet_jax import errors
from resnet_jax import evaluation
from resnet_jax import hosts
from resnet_jax import optim
from resnet_jax import parallel
from resnet_jax import paths
from resnet_jax import preemption as preemption_lib
from resnet_jax import resume_config
from resnet_jax import run_log
from resnet_jax.data import eval_stream
from resnet_jax.data import inputs as inputs_lib
from resnet_jax.data import train_stream


def every(value: int, steps_per_epoch: int) -> int:
  """A period in steps; 0 means once per epoch."""
  return value if value > 0 else steps_per_epoch


# Kept here for callers that catch train.Preempted.
Preempted = preemption_lib.Preempted
Setup = assembly.Setup
setup = assembly.setup
evaluate = evaluation.evaluate  # (the loop calls it through this name: tests replace it)
clu_metrics_from_sums = evaluation.clu_metrics_from_sums


def _prefetch(iterator: Iterator, put, size: int) -> Iterator:
  """Keeps `size` batches on their way to the devices (transfers are asynchronous)."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or continues training) in `workdir` (a local path or gs://...).

  Returns the last eval metrics.
  """
  workdir = paths.workdir_path(workdir)
  run = setup(config)  # every config value and the data, before the workdir is touched
  with hosts.claim(workdir):  # a second run on it stops at once, naming this one
    ckpt = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
      changes = resume_config.check_resume(config, workdir, ckpt)
      state, step, loop = assembly.restore_or_init(run.strategy, ckpt, config)
      # SIGTERM stopped the evaluation of this step: it runs first (see Preemption).
      pending_eval = bool(loop.get('pending_eval'))
      # (metrics.jsonl is read, and any bad line before its last reported, before anything
      # is written)
      writer = run_log.create_writer(workdir, step if step else None, pending_eval)
      try:
        resume_config.record_changes(workdir, changes)
        resume_config.save_config(config, workdir, run.cpu_kernels_used)
        result = _train(config, workdir, run, ckpt, writer, state, step, loop, pending_eval)
      except BaseException:
        _close_after_error(writer.close, 'the metric writers')
        raise
      writer.close()
    except BaseException:
      _close_after_error(ckpt.close, 'the checkpoint manager')
      raise
    ckpt.close()
    return result


def _close_after_error(close: Any, what: str) -> None:
  """Closes after a failure without hiding it: a second error on closing (the same full
  disk, say) is logged in one line, and the first one is what the user sees."""
  try:
    close()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Closing %s after the error below also failed: %s: %s', what,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else '')


@dataclasses.dataclass(frozen=True)
class Turn:
  """What one pass of the training loop does at its step besides training it: evaluate
  there, or only evaluate (`resumed`: the restored step, whose evaluation SIGTERM stopped
  before the restart, after its checkpoint was saved)."""
  evaluate: bool
  resumed: bool = False


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
  # SIGTERM stopped the evaluation of the restored step: the first turn only evaluates it.
  turn = Turn(evaluate=True, resumed=True) if pending_eval else None
  preempted = False
  with preemption_lib.Preemption() as preemption:  # until the last save has finished
    try:
      while turn is not None or step < steps_total:
        if turn is None:  # train a step
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
            state = _update_schedule(strategy, state, optim.after_train_log, config.schedule,
                                     train['train_top1_error'])
          turn = Turn(evaluate=step % eval_every == 0 or step == steps_total)

        if turn.evaluate:
          with clock.paused(state):
            step_metrics = evaluate(strategy, state, eval_stream.eval_batches(config.data, inp),
                                    stop=preemption.reached)
            if step_metrics is not None and step == steps_total and config.data.final_eval_crop:
              step_metrics = _final_evaluation(config, inp, strategy, state, step_metrics,
                                               preemption)
          if step_metrics is None:  # SIGTERM: save now, evaluate this state after the restart
            logging.warning('SIGTERM during the evaluation at step %d: stopped it to save.', step)
            if not turn.resumed:  # (a resumed one's checkpoint is saved already)
              with clock.paused(state):
                _save(ckpt, strategy, step, state, window, pending_eval=True)
            preempted = True
            break
          if turn.resumed and not math.isfinite(step_metrics['eval_loss']):
            # The saved state itself is diverged: restarting would evaluate it again.
            ckpt.move_aside(step, f'diverged: its evaluation (pending when SIGTERM stopped it) '
                                  f'gave the loss {step_metrics["eval_loss"]}')
          _check_finite('eval', step_metrics['eval_loss'], step, ckpt)
          eval_metrics = step_metrics
          writer.write_scalars(step, eval_metrics)
          state = _update_schedule(strategy, state, optim.after_eval, config.schedule,
                                   eval_metrics['eval_top1_error'])

        preempted = preemption.reached()
        if turn.resumed:
          # This step's checkpoint exists (it was saved before its evaluation);
          # its eval metrics are added so that it can be chosen as the best.
          ckpt.set_metrics(step, eval_metrics)
        elif step % ckpt_every == 0 or step == steps_total or preempted:
          with clock.paused(state):
            _save(ckpt, strategy, step, state, window,
                  metrics=eval_metrics if turn.evaluate else None)
        turn = None
        if preempted:
          break
    finally:
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


def _update_schedule(strategy: parallel.Parallel, state: Any, rule: Callable,
                     schedule_config: Any, error: float) -> Any:
  """Applies a host-side learning-rate rule (warm-up end, plateau) to the state."""
  current = jax.tree.map(np.asarray, strategy.to_host(state.schedule))
  new = rule(schedule_config, current, error)
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
