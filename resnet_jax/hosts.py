"""Decisions every host of a run takes together (one process: no communication).

A run on several hosts must never have one host act alone on what only it saw
(a damaged checkpoint, a lock it could not take, a marker file written
meanwhile): the others would wait at the next collective forever.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import numpy as np
from etils import epath

from resnet_jax import errors
from resnet_jax import paths
from resnet_jax import workdir_lock


def any_host(flag: bool) -> bool:
  """Whether `flag` is set on any host (every host must call this together)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def worst(outcome: int) -> int:
  """The largest of the hosts' outcomes: the one every host acts on."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def sync(name: str) -> None:
  """Every host waits here until all have arrived (e.g. after process 0 moved files)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def claim(directory: epath.Path, name: str = workdir_lock.LOCK_NAME,
          purpose: str = 'train') -> Iterator[None]:
  """`directory`, created if need be, locked (lock file `name`) for the `with` block by
  process 0; if it could not be, every host raises WorkdirInUseError together."""
  with contextlib.ExitStack() as stack:
    error = None
    try:
      paths.make_workdir(directory)
      stack.enter_context(workdir_lock.hold(directory, name, purpose=purpose,
                                            enabled=jax.process_index() == 0))
    except errors.UserError as e:
      error = e
    if any_host(error is not None):
      raise error or errors.WorkdirInUseError(
          f'{directory}: process 0 could not claim it (see its message).')
    yield
