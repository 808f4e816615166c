"""Stopping a run cleanly: SIGTERM (TPU VM preemption, maintenance) and Ctrl-C.

Either signal stops training at the next safe point, where it saves a
checkpoint and returns (`Preempted`); the same command continues exactly.
Safe points are the end of each training step and the start of each
evaluation batch, so an evaluation (50,000 ImageNet images, 10 crops) never
holds up a preemption notice.

One process: our own handlers. Several: JAX's preemption sync manager
(started by jax.distributed.initialize) catches SIGTERM on any host and picks
one safe point at which every host stops, so that they all save together;
Ctrl-C on a host is passed to it as SIGTERM. Every host passes the same safe
points in the same order (the same steps and the same number of eval
batches), which is what it needs.

A second signal while the run stops and saves does not interrupt the save: it
logs a warning, and only a further Ctrl-C after that aborts (without the
checkpoint being finished).
"""
from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging


class Preempted(Exception):
  """Training stopped early on SIGTERM or Ctrl-C after saving a checkpoint (not an error)."""


class Preemption:
  """Context manager that turns SIGTERM and SIGINT into a request to stop at a safe point;
  its handlers stay until the block exits (after the last save has finished)."""

  def __init__(self):
    self._event = threading.Event()
    self._multihost = jax.process_count() > 1
    self._safe_points = 0
    self._previous: dict[int, Any] = {}
    self._signals = 0
    self.signal_name = 'SIGTERM'

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      handled = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)
      for signum in handled:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self._signals += 1
    name = signal.Signals(signum).name
    if self._signals == 1:
      self.signal_name = name
      logging.warning('%s: stopping at the next safe point to save a checkpoint.',
                      'Ctrl-C' if signum == signal.SIGINT else name)
      if self._multihost:  # JAX's preemption sync manager makes every host stop together
        signal.raise_signal(signal.SIGTERM)
      else:
        self._event.set()
    elif self._signals == 2 or signum != signal.SIGINT:
      logging.warning('%s: the run is already stopping to save a checkpoint, which this does '
                      'not interrupt. Press Ctrl-C again to abort at once, without that '
                      'checkpoint.', name)
    else:
      raise KeyboardInterrupt(f'{name} again: aborted without saving.')

  def reached(self) -> bool:
    """Whether to stop here; call at every safe point, on every host alike."""
    if self._multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self._safe_points += 1
      return multihost_utils.reached_preemption_sync_point(self._safe_points)
    return self._event.is_set()

  def message(self, step: int) -> str:
    what = 'Ctrl-C' if self.signal_name == 'SIGINT' else self.signal_name
    return (f'{what}: saved a checkpoint at step {step} and stopped; rerun the same command to '
            'continue.')
