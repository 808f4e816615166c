"""Decisions every host of a run takes together (one process: no communication).

A run on several hosts must never have one host act alone on what only it saw
(a damaged checkpoint, a lock it could not take, a marker file written
meanwhile): the others would wait at the next collective forever.
"""
from __future__ import annotations

import jax
import numpy as np


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
