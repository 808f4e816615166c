"""Every config value checked in one pass, before a run reads data or writes anything.

A bad value used to surface wherever it was first used: a ZeroDivisionError in
the loop, an error after config.json and the event files were written, or
nothing at all (a negative learning rate trains uphill). `validate` reports
every problem of a config in one message, each naming its field.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from resnet_jax import backend
from resnet_jax import errors
from resnet_jax import models
from resnet_jax import optim
from resnet_jax import parallel
from resnet_jax.data import host_preprocess
from resnet_jax.data import normalization

# What a value must be: (test, the words for it).
_AT_LEAST_1 = (lambda v: v >= 1, 'at least 1')
_POSITIVE = (lambda v: v > 0, 'positive')
_UNIT = (lambda v: 0 <= v < 1, 'in [0, 1)')


def _non_negative(zero_means: str = '') -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v >= 0, f'0{f" ({zero_means})" if zero_means else ""} or more')


_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'batch_size': _AT_LEAST_1,
    'eval_batch_size': _AT_LEAST_1,
    'log_every_steps': _AT_LEAST_1,
    'eval_every_steps': _non_negative('once per epoch'),
    'checkpoint_every_steps': _non_negative('once per epoch'),
    'keep_checkpoints': _AT_LEAST_1,
    'optimizer.learning_rate': _non_negative(),
    'optimizer.momentum': _UNIT,
    'optimizer.weight_decay': _non_negative(),
    'optimizer.base_batch_size': _non_negative('no scaling'),
    'schedule.factor': _POSITIVE,
    'schedule.patience': _AT_LEAST_1,
    'schedule.min_improvement': _non_negative(),
    'schedule.warmup_length': _non_negative(),
    'schedule.warmup_lr': _non_negative(),
    'model.bn_momentum': _UNIT,
    'model.bn_epsilon': _POSITIVE,
    'data.image_size': _AT_LEAST_1,
    'data.crop_padding': _non_negative(),
    'data.pca_lighting': _non_negative(),
    'data.eval_resize': _non_negative('no resize'),
    'data.validation_size': _non_negative(),
    'data.prefetch': _AT_LEAST_1,
    'data.worker_buffer': _AT_LEAST_1,
    'data.read_buffer': _AT_LEAST_1,
}


def _get(config: Any, dotted: str) -> Any:
  value = config
  for key in dotted.split('.'):
    value = value[key]
  return value


def problems(config: Any, num_devices: int) -> list[str]:
  """What is wrong with `config` for a run on `num_devices` devices (empty: nothing)."""
  found = []
  for field, (test, want) in _RANGES.items():
    value = _get(config, field)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
        math.isnan(value) or not test(value)):
      found.append(f'config.{field}={value!r} must be {want}')
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    found.append(f'config.num_train_steps={config.num_train_steps} and config.num_epochs='
                 f'{config.num_epochs}: set one of them above 0 (num_train_steps wins when > 0)')
  model_options = dict(config.model)
  checks = [
      lambda: models.check_options(model_options.pop('name'), model_options),
      lambda: host_preprocess.check_train_augment(config.data),
      lambda: host_preprocess.check_eval_crop(config.data),
      lambda: (host_preprocess.check_eval_crop(config.data, 'final_eval_crop')
               if config.data.final_eval_crop else None),
      lambda: normalization.check_normalize(config.data),
      lambda: optim.check_schedule(config.schedule),
      lambda: parallel.check_parallel(config.parallel),
      lambda: backend.cpu_kernel_mode(config.cpu_kernels),
  ]
  if not found:  # the batch-size checks divide by these
    checks.append(lambda: parallel.check_batch_sizes(
        config.batch_size, config.eval_batch_size, config.model.bn_group_size, config.parallel,
        num_devices))
  for check in checks:
    try:
      check()
    except errors.ConfigError as e:
      found.append(str(e).rstrip('.'))
  if 'multi_scale' in (config.data.eval_crop, config.data.final_eval_crop) and (
      config.model.name == 'vgg19'):
    found.append("multi-scale testing needs a fully-convolutional net (a ResNet or plain net); "
                 "vgg19's classifier takes one input size")
  return found


def validate(config: Any, num_devices: int) -> None:
  """Raises one ConfigError listing every problem of `config`."""
  found = problems(config, num_devices)
  if len(found) == 1:
    raise errors.ConfigError(found[0] + '.')
  if found:
    raise errors.ConfigError(f'{len(found)} config values cannot work:\n  ' +
                             '\n  '.join(found) + '\nEvery field and its meaning: '
                             'configs/default.py.')
