"""Two ways to run the same steps on many devices, with one interface.

- `jit` (default): one `jax.jit` step over a `Mesh` of every device of every
  host. The batch is sharded on the 'data' axis, the state is replicated,
  and its buffers are donated. Each host passes its own slice of the global
  batch; `jax.make_array_from_process_local_data` assembles the global array.
- `pmap`: the classic `jax.pmap` over the local devices, reducing gradients,
  BN statistics and metrics over the axis 'batch'.

Both give the same numbers (tested): BN statistics come from the whole global
batch in both (synchronised over 'batch' under pmap), or, with
`bn_group_size`, from the same fixed-size groups of consecutive examples.
The state outside the strategy (for checkpoints) is always a tree of
replicated global arrays, so it restores on any number of devices.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import errors
from resnet_jax import optim
from resnet_jax import steps

PARALLEL_MODES = ('jit', 'pmap')
PMAP_AXIS = 'batch'


@dataclasses.dataclass(frozen=True)
class Parallel:
  """A parallel strategy: where state and batches live and how the steps run.

  "Global form" is a tree of global arrays replicated over all devices, the
  same in both strategies: what checkpoints save and restore.
  """
  # rng -> placed initial state
  init_state: Callable[[jax.Array], steps.TrainState]
  # shapes, dtypes and shardings of the state in global form
  abstract_state: Callable[[jax.Array], Any]
  # any tree in global form (or host values equal on all hosts) -> placed, and back
  replicate: Callable[[Any], Any]
  unreplicate: Callable[[Any], Any]
  # this host's numpy batch -> placed batch
  put_batch: Callable[[dict[str, np.ndarray]], Any]
  train_step: Callable[[steps.TrainState, Any], tuple[steps.TrainState, dict[str, jax.Array]]]
  eval_step: Callable[[steps.TrainState, Any], dict[str, jax.Array]]

  def to_host(self, tree: Any) -> Any:
    """A placed tree (state part, metrics) as numpy values."""
    return jax.device_get(self.unreplicate(tree))

  def metrics_to_host(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in self.to_host(metrics).items()}


def check_batch_sizes(batch_size: int, eval_batch_size: int, bn_group_size: int, mode: str,
                      num_devices: int) -> None:
  """Clear errors for batch sizes that the devices or the BN groups cannot split evenly."""
  for field, size in (('batch_size', batch_size), ('eval_batch_size', eval_batch_size)):
    if size % num_devices:
      raise errors.ConfigError(
          f'config.{field}={size} is not divisible by the {num_devices} devices: use a '
          f'multiple of {num_devices} (e.g. {num_devices * max(1, size // num_devices)}).')
  if bn_group_size:
    pmap = mode == 'pmap'
    batch = batch_size // num_devices if pmap else batch_size
    if batch % bn_group_size:
      where = 'per-device batch' if pmap else 'batch'
      raise errors.ConfigError(
          f'config.model.bn_group_size={bn_group_size} does not divide the {where} of {batch}.')


def check_parallel(mode: str) -> None:
  if mode not in PARALLEL_MODES:
    raise errors.ConfigError(f'config.parallel={mode!r}; choose one of '
                             f'{", ".join(PARALLEL_MODES)}.')


def create(mode: str, make_model: Callable[[str | None], Any], *,
           tx: optax.GradientTransformation, lr_fn: Callable[[Any, optim.ScheduleState], Any],
           schedule_state: optim.ScheduleState, input_shape: tuple[int, ...],
           augment: Any = None) -> Parallel:
  """The strategy `mode` (config.parallel): `make_model(bn_axis_name)` builds the net, `tx`
  and `lr_fn(step, schedule_state)` train it (steps.make_steps), `schedule_state` starts the
  schedule, and `augment` (device_augment.DeviceAugment) turns uint8 batches into model
  inputs in the steps. Batch sizes are checked before (config_checks)."""
  check_parallel(mode)
  global_mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(global_mesh, P())
  axis_name = PMAP_AXIS if mode == 'pmap' else None
  model = make_model(axis_name)
  train_fn, eval_fn = steps.make_steps(model, tx, lr_fn, axis_name=axis_name, augment=augment)

  def create_state(rng):
    return steps.create_train_state(model, tx, schedule_state, input_shape, rng)

  def abstract_state(rng):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        jax.eval_shape(create_state, rng))

  if mode == 'jit':
    batch_sharding = NamedSharding(global_mesh, P('data'))
    return Parallel(
        init_state=jax.jit(create_state, out_shardings=replicated),
        abstract_state=abstract_state,
        replicate=lambda tree: _replicated_global(tree, replicated),
        unreplicate=lambda tree: tree,
        put_batch=lambda batch: jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch),
        train_step=jax.jit(train_fn, in_shardings=(replicated, batch_sharding),
                           out_shardings=(replicated, replicated), donate_argnums=0),
        eval_step=jax.jit(eval_fn, in_shardings=(replicated, batch_sharding),
                          out_shardings=replicated),
    )

  local = jax.local_devices()
  n = len(local)
  stacked = NamedSharding(Mesh(np.array(local), (PMAP_AXIS,)), P(PMAP_AXIS))

  def replicate(tree):
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(x, (n,) + np.shape(x)), stacked),
        jax.device_get(tree))

  def put_batch(batch):
    return jax.tree.map(
        lambda x: jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]), stacked), batch)

  return Parallel(
      init_state=lambda rng: replicate(jax.jit(create_state)(rng)),
      abstract_state=abstract_state,
      replicate=replicate,
      unreplicate=lambda tree: _replicated_global(
          jax.device_get(jax.tree.map(lambda x: x[0], tree)), replicated),
      put_batch=put_batch,
      train_step=jax.pmap(train_fn, axis_name=PMAP_AXIS, donate_argnums=0),
      eval_step=jax.pmap(eval_fn, axis_name=PMAP_AXIS),
  )


def _replicated_global(tree: Any, sharding: NamedSharding) -> Any:
  """A tree as replicated global arrays; leaves already in that form are kept as they are.

  Host values must be equal on every host (they are: same seed, same checkpoint).
  """
  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)
