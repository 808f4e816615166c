"""orbax checkpoints in WORKDIR/checkpoints: asynchronous saves, the last K and the best.

A checkpoint holds two items: `state`, the train state as replicated global
arrays (so it restores onto any number of devices or hosts), and `loop`, a
small JSON record of what the training loop needs to continue exactly where
it stopped (the partly accumulated training metrics; whether SIGTERM stopped
the step's evaluation). The finite eval metrics saved with a step decide
which checkpoint is the best.
"""
from __future__ import annotations

import errno
import functools
import json
import math
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from resnet_jax import checkpoint_damage as damage
from resnet_jax import checkpoint_quarantine as quarantine
from resnet_jax import errors
from resnet_jax import hosts
from resnet_jax import paths

BEST_METRIC = 'eval_top1_error'


CheckpointError = errors.CheckpointError


def _finite_error(metrics: dict[str, float]) -> float:
  """The error that ranks a step; none or a non-finite one ranks last."""
  error = metrics.get(BEST_METRIC, math.inf)
  return error if math.isfinite(error) else math.inf


class Checkpoints:
  """Saving and restoring train states for one workdir."""

  def __init__(self, workdir: str | epath.Path, keep: int = 3):
    self.directory = paths.workdir_path(workdir) / 'checkpoints'
    self._closed, self._failed = False, False
    self._saving: int | None = None  # the step of the save in flight, until checked
    if jax.process_index() == 0:  # orbax's constructor would fail on unreadable metrics
      quarantine.set_aside_unreadable_metrics(self.directory)
    hosts.sync('resnet_jax: unreadable metrics set aside')
    error = lambda metrics: _finite_error(metrics or {})
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -error(m), n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=error, best_mode='min',  # makes orbax store the metrics with each step
            enable_async_checkpointing=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'loop': ocp.JsonCheckpointHandler()})

  @functools.cached_property
  def reader(self) -> ocp.CheckpointManager:
    """The manager that restores: on several hosts one per host, without orbax's barrier
    at the end of a restore, so that a host whose read fails never leaves the others
    waiting there (the hosts then agree on what to do with `_agree`)."""
    if jax.process_count() == 1:
      return self.manager
    index = jax.process_index()
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            read_only=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=index, active_processes={index})),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'loop': ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, loop: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` (global arrays) at `step`.

    `metrics` are the eval metrics of this very state (None: not evaluated).
    """
    self.check_saves()
    loop = {**loop, 'checksums': damage.checksums(state)}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
          metrics=metrics or {}, force=True)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      raise self._save_failed(self._saving if self._saving is not None else step, e) from e
    self._saving = step

  def check_saves(self) -> None:
    """Stops the run as soon as an asynchronous save is known to have failed (a full disk),
    naming its step, rather than at the next save."""
    if self._saving is None or self.manager.is_saving_in_progress():
      return
    step, self._saving = self._saving, None
    try:
      self.manager.wait_until_finished()  # at once: it has finished; raises its error
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e

  def wait(self) -> None:
    step, self._saving = self._saving, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e

  def _save_failed(self, step: int | None, error: Exception) -> CheckpointError:
    self._failed = True
    previous = [s for s in self.steps() if step is None or s < step]
    cause = next((e for e in damage.chain(error) if damage.status(e) or isinstance(e, OSError)), error)
    full = (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or (
        damage.status(cause) == 'RESOURCE_EXHAUSTED' and 'writing' in str(cause).lower())
    return CheckpointError(
        f'Saving the checkpoint at step {step} in {self.directory} failed'
        f'{" (no space left on the disk?)" if full else ""}: {type(cause).__name__}: '
        f'{damage.summary(str(cause))}. '
        + (f'The previous checkpoint (step {max(previous)}) is intact: ' if previous else '')
        + 'free space (or fix the storage) and rerun the same command to continue from it.')

  def close(self) -> None:
    """Waits for a save in flight, then releases orbax's threads (again: no-op). After a
    failed save (already reported) orbax's error on closing is only logged."""
    if self._closed:
      return
    self._closed = True
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not self._failed:
        raise self._save_failed(self._saving, e) from e
      logging.warning('Closing the checkpoint manager: %s', damage.first_line(str(e)))

  def set_metrics(self, step: int, metrics: dict[str, float]) -> None:
    """Adds eval metrics to a saved step (its evaluation ran after the save).

    They go where orbax keeps a step's metrics, so `best_step` and the
    retention policy see them.
    """
    self.wait()
    if jax.process_index() == 0:  # written whole, then renamed: a crash leaves the old file
      path = self.directory / str(step) / 'metrics' / 'metrics'
      temporary = path.with_name(f'metrics.tmp-{uuid.uuid4().hex}')
      temporary.write_text(json.dumps(metrics))
      temporary.replace(path)
    hosts.sync('resnet_jax: metrics added')
    self.manager.reload()

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the lowest saved eval error (None if no step has eval metrics)."""
    scored = [(error, -s) for s in self.steps()
              if (error := _finite_error(self.manager.metrics(s) or {})) < math.inf]
    return -min(scored)[1] if scored else None  # ties: the latest, as the retention policy keeps

  def resolve(self, which: str) -> int:
    """'latest', 'best' or a step number -> a saved step, or a clear error."""
    steps = self.steps()
    if not steps:
      raise CheckpointError(f'No checkpoint in {self.directory}: train first, or point --workdir '
                            'at a directory that has checkpoints/.')
    if which == 'latest':
      return max(steps)
    if which == 'best':
      step = self.best_step()
      if step is None:
        raise CheckpointError(f'No checkpoint in {self.directory} has eval metrics, so none is '
                              f'"best"; use --checkpoint=latest or one of: {steps}.')
      return step
    if not which.isdigit() or int(which) not in steps:
      raise CheckpointError(f'--checkpoint={which!r}: use latest, best or a saved step '
                            f'({", ".join(map(str, steps))}).')
    return int(which)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, laid out like `abstract_state` (shapes and shardings).

    (checkpoint_restore.latest_good falls back from the newest to the newest good one.)
    Raises DamagedCheckpointError if its content is missing or corrupt,
    CheckpointAccessError if it may not be read, CheckpointError if it does
    not fit the model, and the original error for anything else.
    """
    problems = damage.differences(self._saved_layout(step), abstract_state)
    if problems:
      raise CheckpointError(
          f'The checkpoint at step {step} in {self.directory} does not fit the configured '
          f'model and optimizer ({len(problems)} differences, e.g. {"; ".join(problems[:4])}).\n'
          'Restore it with the config it was trained with (--mode=eval uses WORKDIR/config.json '
          'unless --config is given), or train in a new workdir.')
    return self._read(step, abstract_state)

  def restore_variables(self, step: int) -> tuple[Any, Any]:
    """(params, batch_stats) at `step` on this process's first device, as saved.

    Needs no model or config: the layout comes from the checkpoint itself
    (for export and inspection).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          self._saved_layout(step))
    state, _ = self._read(step, target)
    return state['params'], state['batch_stats']

  def _saved_layout(self, step: int) -> Any:
    """The saved state's array metadata (shapes, dtypes), once its files may be read."""
    step_dir = self.directory / str(step)
    try:
      damage.check_readable(step_dir)
      self.reader.reload()
      saved = self.reader.item_metadata(step).get('state')
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      damage.raise_classified(step_dir, e)
      raise
    if saved is None:
      raise damage.DamagedCheckpointError(step_dir, 'its state item has no metadata')
    return saved

  def _read(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """The state restored into `target`'s layout, checked against the checksums saved with
    it, and the loop record."""
    step_dir = self.directory / str(step)
    try:
      restored = self.reader.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      damage.raise_classified(step_dir, e)
      raise
    loop = dict(restored['loop'] or {})
    damage.verify(step_dir, restored['state'], loop.pop('checksums', None))
    return restored['state'], loop

  @property
  def damaged_dir(self) -> epath.Path:
    return quarantine.damaged_dir(self.directory)

  def move_aside(self, step: int, why: str) -> None:
    """Moves a checkpoint proven bad to WORKDIR/damaged_checkpoints/, with a note saying why."""
    self.wait()
    if jax.process_index() == 0:
      quarantine.move_aside(self.directory, step, why)
    hosts.sync('resnet_jax: damaged checkpoint moved')
    self.manager.reload()
