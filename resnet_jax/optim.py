"""SGD with momentum and L2 weight decay, and the paper's learning-rate schedules.

The learning rate at a step is `schedule(step) * lr_scale`, or `warmup_lr`
during the ResNet-110 warm-up. `schedule` is a pure function of the step
(step decay, linear warm-up + cosine); `lr_scale` and the warm-up flag live
in `ScheduleState`, part of the train state (so they are checkpointed), and
are changed on the host from measured errors: divide-by-10 when the eval
error plateaus, and the end of the warm-up once the training error is below
80%. jax and optax only, so the train step imports without TensorFlow.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import errors

SCHEDULES = ('constant', 'step', 'plateau', 'cosine')


def base_learning_rate(opt: Any, batch_size: int) -> float:
  """config.optimizer's learning_rate, scaled by batch_size / base_batch_size when that is set."""
  if opt.base_batch_size > 0:
    return opt.learning_rate * batch_size / opt.base_batch_size
  return opt.learning_rate


def create_optimizer(opt: Any) -> optax.GradientTransformation:
  """L2 weight decay (as a gradient term, like the paper) then momentum, from config.optimizer.

  The learning rate is applied by the train step, after momentum, as in
  PyTorch's SGD: v <- mu v + (g + wd w); w <- w - lr v.
  """

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: opt.decay_bn_and_bias or path[-1].key == 'kernel', params)

  return optax.chain(
      optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
      optax.trace(decay=opt.momentum, nesterov=opt.nesterov),
  )


def check_schedule(s: Any) -> None:
  """config.schedule's name, unit and boundaries (before any step count is known)."""
  if s.name not in SCHEDULES:
    raise errors.ConfigError(f'config.schedule.name={s.name!r}; choose one of {", ".join(SCHEDULES)}.')
  if s.unit not in ('steps', 'epochs'):
    raise errors.ConfigError(f"config.schedule.unit={s.unit!r}; choose 'steps' or 'epochs'.")
  if list(s.boundaries) != sorted(s.boundaries) or any(b < 0 for b in s.boundaries):
    raise errors.ConfigError('config.schedule.boundaries must increase from 0 or more, got '
                             f'{tuple(s.boundaries)}.')


def schedule_fn(s: Any, base: float, steps_per_epoch: int,
                total_steps: int) -> Callable[[Any], Any]:
  """step -> learning rate for config.schedule `s` peaking at `base` (base_learning_rate),
  before any plateau scaling or ResNet-110 warm-up."""
  check_schedule(s)
  unit = steps_per_epoch if s.unit == 'epochs' else 1
  warmup = int(round(s.warmup_length * unit))
  if s.name == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup, max(total_steps, warmup + 1))
  if s.name == 'step':
    boundaries = [int(round(b * unit)) for b in s.boundaries]
    main = optax.piecewise_constant_schedule(base, {b: s.factor for b in boundaries})
  else:  # constant, plateau (its divisions come from ScheduleState.lr_scale)
    main = optax.constant_schedule(base)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])
  return main


@flax.struct.dataclass
class ScheduleState:
  """Learning-rate state driven by measured errors (host-side decisions, checkpointed)."""
  lr_scale: Any    # multiplies the schedule; 'plateau' divides it by 1/factor
  warmup: Any      # bool: ResNet-110 warm-up still running
  best_error: Any  # best eval error so far (plateau detection)
  bad_evals: Any   # evaluations since the best one


def init_schedule_state(s: Any) -> ScheduleState:
  """The state before the first step, for config.schedule `s`."""
  return ScheduleState(
      lr_scale=np.float32(1.0),
      warmup=np.bool_(s.warmup_lr > 0),
      best_error=np.float32(np.inf),
      bad_evals=np.int32(0))


def learning_rate(s: Any, schedule: Callable, step: Any, state: ScheduleState) -> Any:
  """The learning rate used at `step` (traceable), for config.schedule `s` and schedule_fn's
  `schedule`."""
  return jnp.where(state.warmup, jnp.float32(s.warmup_lr),
                   schedule(step) * state.lr_scale)


def after_train_log(s: Any, state: ScheduleState, train_error: float) -> ScheduleState:
  """Ends the ResNet-110 warm-up once the measured training error is below the threshold.

  Afterwards the learning rate returns to the schedule (0.1 in the paper),
  which is what the paper does and some reproductions forget.
  """
  if bool(state.warmup) and train_error < s.warmup_until_error:
    return state.replace(warmup=np.bool_(False))
  return state


def after_eval(s: Any, state: ScheduleState, eval_error: float) -> ScheduleState:
  """'plateau' (config.schedule `s`): divides the learning rate by 1/factor when the eval
  error stops improving."""
  if s.name != 'plateau':
    return state
  if eval_error < float(state.best_error) - s.min_improvement:
    return state.replace(best_error=np.float32(eval_error), bad_evals=np.int32(0))
  bad = int(state.bad_evals) + 1
  if bad >= s.patience:
    return state.replace(lr_scale=np.float32(float(state.lr_scale) * s.factor), bad_evals=np.int32(0))
  return state.replace(bad_evals=np.int32(bad))
