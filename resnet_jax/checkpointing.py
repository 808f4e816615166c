"""orbax checkpoints in WORKDIR/checkpoints: asynchronous saves, the last K and the best.

A checkpoint holds two items: `state`, the train state as replicated global
arrays (so it restores onto any number of devices or hosts), and `loop`, a
small JSON record of what the training loop needs to continue exactly where
it stopped (the partly accumulated training metrics). The eval metrics saved
with a step decide which checkpoint is the best.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

BEST_METRIC = 'eval_top1_error'


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not fit the configured model."""


class Checkpoints:
  """Saving and restoring train states for one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    error = lambda metrics: metrics.get(BEST_METRIC, math.inf)  # no eval: the worst
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

  def save(self, step: int, state: Any, loop: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` (global arrays) at `step`.

    `metrics` are the eval metrics of this very state (None: not evaluated).
    """
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
        metrics=metrics or {}, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the lowest saved eval error (None if no step has eval metrics)."""
    scored = [(m[BEST_METRIC], -s) for s in self.steps()
              if (m := self.manager.metrics(s)) and BEST_METRIC in m]
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
    """The state at `step`, laid out like `abstract_state` (shapes and shardings)."""
    step_dir = os.path.join(self.directory, str(step))
    try:
      saved = self.manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      raise DamagedCheckpointError(step_dir, e) from e
    problems = _differences(saved, abstract_state)
    if problems:
      raise CheckpointError(
          f'The checkpoint at step {step} in {self.directory} does not fit the configured '
          f'model and optimizer ({len(problems)} differences, e.g. {"; ".join(problems[:4])}).\n'
          'Restore it with the config it was trained with (--mode=eval uses WORKDIR/config.json '
          'unless --config is given), or train in a new workdir.')
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(step_dir, e) from e
    return restored['state'], dict(restored['loop'] or {})

  def restore_latest_good(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that can be read (None if there is none).

    Damaged checkpoints are moved aside to WORKDIR/damaged_checkpoints/ (not
    deleted) so that training can write that step again. A checkpoint that does
    not fit the config is an error, not a reason to go back.
    """
    damaged = []
    for step in sorted(self.steps(), reverse=True):
      try:
        state, loop = self.restore(step, abstract_state)
      except DamagedCheckpointError as e:
        logging.warning('%s', e)
        damaged.append(step)
        continue
      if damaged:
        self._move_aside(damaged)
        logging.warning('Resuming from step %d: the newer checkpoints %s are damaged and were '
                        'moved to %s.', step, damaged, self._damaged_dir)
      return step, state, loop
    if damaged:
      raise CheckpointError(f'Every checkpoint in {self.directory} is damaged ({damaged}); move '
                            'the directory away to start afresh.')
    return None

  @property
  def _damaged_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')

  def _move_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        target = os.path.join(self._damaged_dir, f'{step}-{int(time.time())}')
        os.makedirs(self._damaged_dir, exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('resnet_jax: damaged checkpoints moved')
    self.manager.reload()


class DamagedCheckpointError(CheckpointError):
  """A checkpoint directory that cannot be read (truncated, deleted files, bad metadata)."""

  def __init__(self, step_dir: str, cause: Exception):
    first_line = (str(cause).strip().splitlines() or [''])[0][:300]
    super().__init__(f'The checkpoint {step_dir} cannot be read ({type(cause).__name__}: '
                     f'{first_line}); it is damaged or incomplete. Delete it to fall back to the '
                     'previous checkpoint.')


def _path_name(path: tuple[Any, ...]) -> str:
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def _differences(saved: Any, abstract: Any) -> list[str]:
  """Where the saved arrays and the expected ones differ in name or shape."""
  shapes = lambda tree: {_path_name(p): tuple(x.shape) for p, x in
                         jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = shapes(saved), shapes(abstract)
  problems = [f'{k}: saved {have[k]}, expected {want[k]}'
              for k in sorted(have.keys() & want.keys()) if have[k] != want[k]]
  problems += [f'{k} is not in the checkpoint' for k in sorted(want.keys() - have.keys())]
  problems += [f'{k} is not in the model' for k in sorted(have.keys() - want.keys())]
  return problems
