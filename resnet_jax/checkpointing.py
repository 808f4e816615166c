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
import os
import re
import time
import uuid
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from resnet_jax import errors
from resnet_jax import paths

BEST_METRIC = 'eval_top1_error'


CheckpointError = errors.CheckpointError


# A restore that fails for another reason than the checkpoint's content (a read
# error, a timeout, memory) is tried this often before the run stops.
RESTORE_ATTEMPTS = 3
RETRY_SECONDS = 2.0

# What orbax and tensorstore say when a checkpoint's files are missing or corrupt:
# Python's error types, and the absl status codes that start tensorstore's ValueError
# messages (FAILED_PRECONDITION: a truncated or undecodable compressed stream).
_CONTENT_ERRORS = (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)
_CONTENT_STATUS = ('NOT_FOUND', 'DATA_LOSS', 'OUT_OF_RANGE', 'FAILED_PRECONDITION')
_CONTENT_MARKERS = ('Error decoding', 'was not found in the checkpoint', 'No such file')
# Access to the storage: never damage, and retrying will not help.
_ACCESS_STATUS = ('PERMISSION_DENIED', 'UNAUTHENTICATED')
# What storage and memory trouble looks like (retried; anything else is a bug: raised).
_TRANSIENT_ERRORS = (OSError, TimeoutError, MemoryError, ConnectionError)
_TRANSIENT_STATUS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'ABORTED',
                     'CANCELLED', 'INTERNAL', 'UNKNOWN')
_OK, _DAMAGED, _FAILED = 0, 1, 2  # restore outcomes, in the order hosts agree on them


def _status(error: BaseException) -> str | None:
  """The absl status code a tensorstore error starts with (`NOT_FOUND: ...`), if any."""
  if not isinstance(error, (ValueError, RuntimeError)):
    return None
  match = re.match(r'([A-Z_]{4,}): ', str(error).lstrip())
  return match.group(1) if match else None


def _chain(error: BaseException | None):
  """The error and its explicit causes (`raise ... from`), not what it was raised during."""
  while error is not None:
    yield error
    error = error.__cause__


def content_damage(error: BaseException) -> str | None:
  """Why `error` shows a checkpoint's content is missing or corrupt; None if it does not.

  Missing files and items, truncated or corrupt array data and unparsable
  metadata are content damage; anything else (permissions, timeouts, transient
  read errors, memory) is not, and must never get a checkpoint moved aside.
  """
  for e in _chain(error):
    if access_denied(e):
      return None
    message = str(e)
    if (isinstance(e, _CONTENT_ERRORS) or _status(e) in _CONTENT_STATUS or
        (isinstance(e, OSError) and e.errno == errno.ENOENT) or
        (isinstance(e, (KeyError, ValueError)) and any(m in message for m in _CONTENT_MARKERS))):
      return f'{type(e).__name__}: {_summary(message)}'
  return None


def access_denied(error: BaseException) -> bool:
  """Whether the storage refused access (permissions, credentials) anywhere in the chain."""
  return any(isinstance(e, PermissionError) or _status(e) in _ACCESS_STATUS
             for e in _chain(error))


def transient(error: BaseException) -> bool:
  """Whether `error` looks like storage or memory trouble that may pass (worth a retry)."""
  return isinstance(error, _TRANSIENT_ERRORS) or _status(error) in _TRANSIENT_STATUS


def _first_line(message: str) -> str:
  return (message.strip().strip('"\'').splitlines() or [''])[0][:1000]


def _summary(message: str) -> str:
  """tensorstore's long error chains cut to the status, the innermost file and what failed."""
  message = _first_line(message.split(' [tensorstore_spec')[0] + '\n')
  files = re.findall(r'file "([^"]+)"', message)
  if not files:
    return message
  status = re.match(r'([A-Z_]+): ', message)
  detail = message.rsplit(f'{files[-1]}"', 1)[1].lstrip(': ')
  return f'{status.group(1) + ": " if status else ""}{files[-1]}: {detail}'[:300]


def _finite_error(metrics: dict[str, float]) -> float:
  """The error that ranks a step; none or a non-finite one ranks last."""
  error = metrics.get(BEST_METRIC, math.inf)
  return error if math.isfinite(error) else math.inf


def _agree(outcome: int) -> int:
  """The outcome every host acts on: the worst any host saw (one shared decision)."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  agreed = int(np.max(multihost_utils.process_allgather(np.int32(outcome))))
  if agreed not in (_OK, _DAMAGED, _FAILED):
    raise RuntimeError(f'The hosts disagree on restoring a checkpoint (got {agreed}).')
  return agreed


class Checkpoints:
  """Saving and restoring train states for one workdir."""

  def __init__(self, workdir: str | epath.Path, keep: int = 3):
    self.directory = paths.workdir_path(workdir) / 'checkpoints'
    self._closed, self._failed = False, False
    self._saving: int | None = None  # the step of the save in flight, until checked
    _set_aside_unreadable_metrics(self.directory)  # orbax's constructor would fail on them
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
    loop = {**loop, 'checksums': checksums(state)}
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
    cause = next((e for e in _chain(error) if _status(e) or isinstance(e, OSError)), error)
    full = (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or (
        _status(cause) == 'RESOURCE_EXHAUSTED' and 'writing' in str(cause).lower())
    return CheckpointError(
        f'Saving the checkpoint at step {step} in {self.directory} failed'
        f'{" (no space left on the disk?)" if full else ""}: {type(cause).__name__}: '
        f'{_summary(str(cause))}. '
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
      logging.warning('Closing the checkpoint manager: %s', _first_line(str(e)))

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
    _sync('resnet_jax: metrics added')
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

    Raises DamagedCheckpointError if its content is missing or corrupt,
    CheckpointError if it does not fit the model, and the original error for
    anything else.
    """
    step_dir = self.directory / str(step)
    try:
      _check_readable(step_dir)
      self.reader.reload()
      saved = self.reader.item_metadata(step).get('state')
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      _raise_damaged(step_dir, e)
      raise
    if saved is None:
      raise DamagedCheckpointError(step_dir, 'its state item has no metadata')
    problems = _differences(saved, abstract_state)
    if problems:
      raise CheckpointError(
          f'The checkpoint at step {step} in {self.directory} does not fit the configured '
          f'model and optimizer ({len(problems)} differences, e.g. {"; ".join(problems[:4])}).\n'
          'Restore it with the config it was trained with (--mode=eval uses WORKDIR/config.json '
          'unless --config is given), or train in a new workdir.')
    try:
      restored = self.reader.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      _raise_damaged(step_dir, e)
      raise
    loop = dict(restored['loop'] or {})
    _verify(step_dir, restored['state'], loop.pop('checksums', None))
    return restored['state'], loop

  def restore_variables(self, step: int) -> tuple[Any, Any]:
    """(params, batch_stats) at `step` on this process's first device, as saved.

    Needs no model or config: the layout comes from the checkpoint itself
    (for export and inspection).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    step_dir = self.directory / str(step)
    try:
      _check_readable(step_dir)
      saved = self.reader.item_metadata(step).get('state')
      if saved is None:
        raise DamagedCheckpointError(step_dir, 'its state item has no metadata')
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            saved)
      restored = self.reader.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore()))
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _raise_damaged(step_dir, e)
      raise
    state = restored['state']
    _verify(step_dir, state, dict(restored['loop'] or {}).get('checksums'))
    return state['params'], state['batch_stats']

  def _restore_with_retries(self, step: int, abstract_state: Any):
    """(outcome, restored or the error): retries errors that are not content damage."""
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
      try:
        return _OK, self.restore(step, abstract_state)
      except DamagedCheckpointError as e:
        return _DAMAGED, e
      except CheckpointAccessError as e:
        return _FAILED, e  # permissions or credentials: retrying will not help
      except CheckpointError:
        raise  # does not fit the model: the config is wrong, nothing is damaged
      except Exception as e:  # pylint: disable=broad-except
        if not transient(e):
          raise  # a bug, not the storage: its traceback matters
        if attempt == RESTORE_ATTEMPTS:
          return _FAILED, e
        logging.warning('Restoring the checkpoint at step %d failed (attempt %d of %d: %s: %s); '
                        'retrying.', step, attempt, RESTORE_ATTEMPTS, type(e).__name__,
                        _first_line(str(e)))
        time.sleep(RETRY_SECONDS * 2 ** (attempt - 1))

  def restore_latest_good(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that can be read (None if there is none).

    Only a checkpoint whose content is missing or corrupt is moved aside, to
    WORKDIR/damaged_checkpoints/ (not deleted), so that training can write that
    step again; the hosts decide together. Any other failure is retried and
    then stops the run with its error, with nothing moved. A checkpoint that
    does not fit the config is an error, not a reason to go back.
    """
    damaged = []
    for step in sorted(self.steps(), reverse=True):
      outcome, result = self._restore_with_retries(step, abstract_state)
      agreed = _agree(outcome)
      if agreed == _FAILED:
        error = result if outcome == _FAILED else RuntimeError('it failed on another host')
        if isinstance(error, CheckpointAccessError):
          raise error
        how = f'after {RESTORE_ATTEMPTS} attempts'
        raise CheckpointError(
            f'Could not restore the checkpoint at step {step} in {self.directory}: {how} '
            f'({type(error).__name__}: {_first_line(str(error))}). Nothing was moved or '
            'deleted: fix the cause (permissions, storage access, memory) and rerun the same '
            'command.') from (result if outcome == _FAILED else None)
      if agreed == _DAMAGED:
        logging.warning('%s', result if outcome == _DAMAGED else
                        f'The checkpoint at step {step} is damaged on another host.')
        self.move_aside(step, str(result) if outcome == _DAMAGED else 'damaged on another host')
        damaged.append(step)
        continue
      if outcome != _OK:
        raise RuntimeError(f'Restoring step {step}: agreed {agreed}, but this host saw {outcome}.')
      if damaged:
        logging.warning('Resuming from step %d: the newer checkpoints %s are damaged and were '
                        'moved to %s.', step, damaged, self._damaged_dir)
      state, loop = result
      return step, state, loop
    if damaged or (self._damaged_dir.exists() and any(self._damaged_dir.iterdir())):
      earlier = '' if damaged else ' earlier'
      raise CheckpointError(
          f'No usable checkpoint in {self.directory}: every one was found damaged{earlier} and '
          f'moved to {self._damaged_dir} (each with WHY_DAMAGED.txt). Training does not start '
          f'over on its own: to start afresh here, delete {self._damaged_dir}; or use a new '
          'workdir.')
    return None

  @property
  def _damaged_dir(self) -> epath.Path:
    return self.directory.parent / 'damaged_checkpoints'

  def move_aside(self, step: int, why: str) -> None:
    """Moves a checkpoint proven bad to WORKDIR/damaged_checkpoints/, with a note saying why."""
    self.wait()
    if jax.process_index() == 0:
      self._damaged_dir.mkdir(parents=True, exist_ok=True)
      target = self._damaged_dir / f'{step}-{int(time.time())}'
      (self.directory / str(step)).rename(target)
      (target / 'WHY_DAMAGED.txt').write_text(why + '\n')
      logging.warning('Moved the checkpoint at step %d to %s: %s', step, target, why)
    _sync('resnet_jax: damaged checkpoint moved')
    self.manager.reload()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files are missing or corrupt (truncated, deleted, unparsable)."""

  def __init__(self, step_dir: epath.Path, why: str):
    super().__init__(f'The checkpoint {step_dir} cannot be read ({why}); it is damaged or '
                     'incomplete. Delete it to fall back to the previous checkpoint.')


class CheckpointAccessError(CheckpointError):
  """A checkpoint that this user or machine may not read: intact, never moved."""

  def __init__(self, step_dir: epath.Path, error: BaseException):
    if isinstance(error, OSError) and error.filename:
      why = f'{error.strerror}: {error.filename}'
    else:
      why = f'{type(error).__name__}: {_first_line(str(error))}'
    super().__init__(f'The checkpoint {step_dir} cannot be read: access was denied ({why}). '
                     'Nothing was moved or deleted: fix its permissions (or credentials) and '
                     'rerun the same command.')


def _raise_damaged(step_dir: epath.Path, error: Exception) -> None:
  """A restore's error as what it means: damaged content, or access denied."""
  if access_denied(error):
    raise CheckpointAccessError(step_dir, error) from error
  why = content_damage(error)
  if why is not None:
    raise DamagedCheckpointError(step_dir, why) from error


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


def checksums(state: Any) -> dict[str, int]:
  """CRC-32 of each array's bytes, saved with a checkpoint and checked when it is restored:
  tensorstore reads some corrupt compressed data without an error, as other numbers. The
  arrays are replicated, so every host computes the same sums from its own copy."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {_path_name(path): zlib.crc32(np.ascontiguousarray(
      np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)).view(np.uint8))
          for path, x in leaves}


def _verify(step_dir: epath.Path, state: Any, saved: dict[str, int] | None) -> None:
  """Restored arrays whose bytes differ from those saved make the checkpoint damaged
  (checkpoints written before checksums were saved are not checked)."""
  if saved is None:
    return
  wrong = sorted(name for name, crc in checksums(state).items() if saved.get(name) != crc)
  if wrong:
    raise DamagedCheckpointError(
        step_dir, f'{len(wrong)} arrays differ from the checksums saved with them, e.g. '
        f'{", ".join(wrong[:3])}')


def _check_readable(step_dir: epath.Path) -> None:
  """A local checkpoint file or folder that this user may not read raises PermissionError:
  orbax reports an unreadable item as one without metadata, which would look like damage."""
  if paths.is_remote(step_dir):
    return  # GCS reports PERMISSION_DENIED itself

  def fail(error: OSError) -> None:
    raise error

  for root, _, files in os.walk(step_dir, onerror=fail):
    for path in [root] + [os.path.join(root, name) for name in files]:
      if not os.access(path, os.R_OK | (os.X_OK if path == root else 0)):
        raise PermissionError(errno.EACCES, 'Permission denied', path)


def _set_aside_unreadable_metrics(directory: epath.Path) -> None:
  """Renames each step's eval-metrics file that holds no JSON (a crash while it was written)
  to metrics.unreadable-TIME: the step's state is intact and still restores, it only loses
  its say in which step is the best. Files that cannot be read at all are left alone."""
  if jax.process_index() == 0 and directory.exists():
    for step_dir in directory.iterdir():
      path = step_dir / 'metrics' / 'metrics'
      if not step_dir.name.isdigit() or not path.exists():
        continue
      try:
        json.loads(path.read_text())
      except OSError as e:
        raise CheckpointAccessError(step_dir, e) from e
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        target = path.with_name(f'metrics.unreadable-{int(time.time())}')
        path.rename(target)
        logging.warning('The eval metrics of %s are unreadable (%s): moved to %s; the step '
                        'still restores, but is no longer a candidate for the best checkpoint.',
                        step_dir, _first_line(str(e)) or 'empty', target)
  _sync('resnet_jax: unreadable metrics set aside')
