"""orbax checkpoints in WORKDIR/checkpoints: asynchronous saves, the last K and the best.

A checkpoint holds two items: `state`, the train state as replicated global
arrays (so it restores onto any number of devices or hosts), and `loop`, a
small JSON record of what the training loop needs to continue exactly where
it stopped (the partly accumulated training metrics). The eval metrics saved
with a step decide which checkpoint is the best.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

BEST_METRIC = 'eval_top1_error'


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not fit the configured model."""


class Checkpoints:
  """Saving and restoring train states for one workdir."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m[BEST_METRIC], n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=True, read_only=read_only,
            create=not read_only),
        item_names=('state', 'loop'))

  def save(self, step: int, state: Any, loop: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` (global arrays) at `step`."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
        metrics=metrics, force=True)

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
    scored = [(m[BEST_METRIC], s) for s in self.steps()
              if (m := self.manager.metrics(s)) and BEST_METRIC in m]
    return min(scored)[1] if scored else None

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
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged or foreign checkpoint
      raise CheckpointError(
          f'Cannot restore the checkpoint at step {step} in {self.directory}: '
          f'{type(e).__name__}: {str(e)[:2000]}\n'
          'If the config changed (model, number of classes, optimizer), restore with the config '
          'the checkpoint was trained with (the default for --mode=eval: WORKDIR/config.json), '
          'or train in a new workdir. If the files are damaged, delete that step directory to '
          'fall back to the previous checkpoint.') from e
    _check_shapes(restored['state'], abstract_state, step)
    return restored['state'], dict(restored['loop'] or {})

  def restore_latest_good(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that restores, skipping damaged ones (None if there is none)."""
    errors = []
    for step in sorted(self.steps(), reverse=True):
      try:
        state, loop = self.restore(step, abstract_state)
        if errors:
          logging.warning('Resumed from step %d; newer checkpoints failed:\n%s', step,
                          '\n'.join(errors))
        return step, state, loop
      except CheckpointError as e:
        errors.append(str(e).splitlines()[0])
        if _is_mismatch(e):
          raise
    if errors:
      raise CheckpointError('No checkpoint in %s could be restored:\n%s' % (
          self.directory, '\n'.join(errors)))
    return None


def _is_mismatch(error: CheckpointError) -> bool:
  return isinstance(error.__cause__, (ValueError, KeyError)) and 'shape' in str(error).lower() \
      or 'does not fit' in str(error)


def _check_shapes(restored: Any, abstract: Any, step: int) -> None:
  got = jax.tree.map(lambda x: tuple(x.shape), restored)
  want = jax.tree.map(lambda x: tuple(x.shape), abstract)
  if got != want:
    raise CheckpointError(f'The checkpoint at step {step} does not fit the configured model: '
                          'its arrays have other shapes (a different model, number of classes or '
                          'optimizer?).')
