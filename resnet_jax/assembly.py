"""A run assembled from its config: data, model, optimizer, schedule, parallel strategy.

Training, evaluation, export and the report all start here, so they build
exactly the same network and input side; none of them needs the trainer. The
backend-dependent choices (backend.py) are made here, once, before anything is
traced, after every config value has been checked (config_checks.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from resnet_jax import backend
from resnet_jax import checkpoint_restore
from resnet_jax import checkpointing
from resnet_jax import config_checks
from resnet_jax import errors
from resnet_jax import models
from resnet_jax import optim
from resnet_jax import parallel
from resnet_jax.data import device_augment as augment_lib
from resnet_jax.data import inputs as inputs_lib
from resnet_jax.data import normalization


def total_steps(config: Any, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(math.ceil(config.num_epochs * steps_per_epoch))


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
  input_shape = (config.data.image_size, config.data.image_size, 3)
  augment = normalization.device_augment(config.data, inp.builder, inp.splits.train,
                                         inputs_lib.derive_seed(config.seed, 'augment'))
  strategy = create_strategy(
      config,
      lambda axis: models.create_model_from_config(config.model, inp.num_classes,
                                                   bn_axis_name=axis, **run_options),
      input_shape, steps_per_epoch=inp.steps_per_epoch, steps_total=steps_total,
      augment=augment)
  return Setup(inp, strategy, steps_total, cpu_kernels.description, augment)


def create_strategy(config: Any, make_model: Callable[[str | None], Any],
                    input_shape: tuple[int, ...], *, steps_per_epoch: int, steps_total: int,
                    augment: augment_lib.DeviceAugment | None = None) -> parallel.Parallel:
  """config.parallel's strategy for `make_model(bn_axis_name)`, trained with config.optimizer
  and config.schedule: each section goes to its own module, with the explicit values
  (batch size, step counts) it needs."""
  schedule = optim.schedule_fn(config.schedule,
                               optim.base_learning_rate(config.optimizer, config.batch_size),
                               steps_per_epoch, steps_total)
  return parallel.create(
      config.parallel, make_model, tx=optim.create_optimizer(config.optimizer),
      lr_fn=functools.partial(optim.learning_rate, config.schedule, schedule),
      schedule_state=optim.init_schedule_state(config.schedule), input_shape=input_shape,
      augment=augment)


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
  check_shapes(config.init_from, config.model.name,
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


def restore_or_init(strategy: parallel.Parallel, ckpt: checkpointing.Checkpoints,
                    config: Any) -> tuple[Any, int, dict[str, Any]]:
  """(placed state, step, loop record): the newest good checkpoint, or a fresh state (from
  config.init_from's weights, if given)."""
  rng = jax.random.key(config.seed)
  restored = checkpoint_restore.latest_good(ckpt, strategy.abstract_state(rng))
  if restored is None:
    return initial_state(strategy, config), 0, {}
  step, state, loop = restored
  logging.info('Resuming from the checkpoint at step %d.', step)
  return strategy.replicate(state), step, loop


def check_shapes(source: str, net: str, loaded: Any, expected: Any) -> None:
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
