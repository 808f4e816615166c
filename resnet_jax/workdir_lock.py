"""One run per workdir: a lock file held for the whole run.

Two runs on one workdir would interleave metrics.jsonl lines and replace each
other's checkpoints, so a run claims the workdir first and a second run stops
with a message naming the first. The lock file is JSON (host, pid, purpose,
start time, a random token, a heartbeat time), so a user can see who holds it
and the next run can tell a live holder from a dead one:
- on this host, a holder whose pid no longer exists is gone;
- anywhere, a holder whose heartbeat is older than `timeout_s` is gone (a
  daemon thread rewrites it every `timeout_s / 4`; on another host that is the
  only sign of life, and on this one it catches a pid reused after a reboot).
A gone holder's lock is taken over with a compare-and-swap (lock_stores.py: object
generations on gs://, O_EXCL files locally), so of several runs racing for it exactly
one wins.
Only one process of a multi-host run should hold it; the module does not
import jax, so the caller says which (`enabled=jax.process_index() == 0`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Iterator

from absl import logging

from resnet_jax import errors
from resnet_jax import lock_stores

LOCK_NAME = 'LOCK'
DEFAULT_TIMEOUT_S = 600.0
# How long acquire() keeps trying while another process is mid-way through creating or taking
# over the lock, before it reports the holder it last saw.
_SETTLE_S = 2.0


def _utc(epoch: float) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)


@dataclasses.dataclass
class Holder:
  """Who holds a lock: the content of its file."""
  host: str
  pid: int
  purpose: str
  started: float  # epoch seconds
  heartbeat: float  # epoch seconds
  token: str

  @classmethod
  def new(cls, purpose: str) -> Holder:
    now = time.time()
    return cls(host=socket.gethostname(), pid=os.getpid(), purpose=purpose, started=now,
               heartbeat=now, token=secrets.token_hex(16))

  def encode(self) -> bytes:
    record = {'host': self.host, 'pid': self.pid, 'purpose': self.purpose,
              'started': _utc(self.started).isoformat(), 'started_epoch': self.started,
              'heartbeat': _utc(self.heartbeat).isoformat(), 'heartbeat_epoch': self.heartbeat,
              'token': self.token}
    return (json.dumps(record, indent=2) + '\n').encode()

  @classmethod
  def decode(cls, data: bytes) -> Holder | None:
    """None for a file that is not (yet) a whole lock record."""
    try:
      record = json.loads(data)
      return cls(host=str(record['host']), pid=int(record['pid']),
                 purpose=str(record.get('purpose', '')), started=float(record['started_epoch']),
                 heartbeat=float(record['heartbeat_epoch']), token=str(record['token']))
    except (ValueError, TypeError, KeyError):
      return None

  def describe(self) -> str:
    return (f'host {self.host}, pid {self.pid}, started {_utc(self.started):%Y-%m-%d %H:%M:%S} '
            f'UTC, last heartbeat {max(0, time.time() - self.heartbeat):.0f} s ago')

  def is_gone(self, timeout_s: float) -> bool:
    """Dead on this host, or silent for longer than `timeout_s` anywhere."""
    if time.time() - self.heartbeat > timeout_s:
      return True
    if self.host == socket.gethostname():
      try:
        os.kill(self.pid, 0)
      except ProcessLookupError:
        return True
      except PermissionError:  # alive, another user's
        pass
    return False


def _in_use(store: lock_stores.Store, name: str, holder: Holder | None, written: float) -> str:
  place = store.path.rpartition('/')[0]
  what = place if name == LOCK_NAME else f'{name} in {place}'
  if holder is None:
    return (f'{what} is in use by another run: its lock file {store.path} cannot be read '
            f'(written {_utc(written):%Y-%m-%d %H:%M:%S} UTC). If no run is using it, '
            f'delete {store.path}.')
  return (f'{what} is in use by another run'
          + (f' ({holder.purpose})' if holder.purpose else '')
          + f': {holder.describe()} (lock file {store.path}). Wait for it to finish, or stop '
          f'it; if it is gone (e.g. its machine died), delete {store.path}.')


class Lock:
  """A held lock; a daemon thread keeps its heartbeat fresh until release()."""

  def __init__(self, store: lock_stores.Store, holder: Holder, version: Any, timeout_s: float):
    self._store = store
    self.holder = holder
    self._version = version
    self.timeout_s = timeout_s
    self._mutex = threading.Lock()  # a heartbeat must not rewrite a released lock
    self._released = False
    self._lost = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat_until_released, daemon=True,
                                    name=f'heartbeat {store.path}')
    self._thread.start()

  @property
  def path(self) -> str:
    return self._store.path

  @property
  def lost(self) -> bool:
    """Whether another run took the lock over (it judged this one gone)."""
    return self._lost

  def _beat_until_released(self) -> None:
    while not self._stop.wait(self.timeout_s / 4):
      try:
        self.heartbeat()
      except Exception as e:  # pylint: disable=broad-except  (a network hiccup: try next time)
        logging.warning('Could not refresh the heartbeat of %s: %s', self.path, e)
      if self._lost:
        return

  def heartbeat(self) -> None:
    """Rewrites the heartbeat time if the lock is still ours."""
    with self._mutex:
      if self._released or self._lost:
        return
      self.holder.heartbeat = time.time()
      version = self._store.replace(self.holder.encode(), self._version)
      if version is None:
        version = self._our_version()
      if version is None:
        self._lost = True
        logging.warning('%s was deleted or taken over by another run: this run no longer '
                        'holds it.', self.path)
      else:
        self._version = version

  def _our_version(self) -> Any | None:
    """The file's version if it still holds our token (e.g. a retried write that had
    landed), else None."""
    found = self._store.read()
    if found is not None:
      holder = Holder.decode(found[0])
      if holder is not None and holder.token == self.holder.token:
        return found[1]
    return None

  def release(self) -> None:
    """Deletes the lock file if it is still ours; idempotent."""
    self._stop.set()
    with self._mutex:
      if self._released:
        return
      self._released = True
      if self._lost:
        return
      if not self._store.delete(self._version):
        version = self._our_version()
        if version is None or not self._store.delete(version):
          logging.warning('%s was deleted or taken over by another run: left as it is.',
                          self.path)
    self._thread.join(timeout=10)


def acquire(directory: str | os.PathLike, name: str = LOCK_NAME, *, purpose: str = 'train',
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Lock:
  """Takes the lock file `name` in `directory` (local or gs://), or raises WorkdirInUseError.

  A holder that is gone (see the module docstring) is taken over.
  """
  store = lock_stores.store_for(directory, name)
  ours = Holder.new(purpose)
  holder, written = None, time.time()
  deadline = time.monotonic() + _SETTLE_S
  while True:
    ours.heartbeat = time.time()
    version = store.create(ours.encode())
    if version is not None:
      return Lock(store, ours, version, timeout_s)
    found = store.read()
    if found is not None:  # else released meanwhile: create it again
      data, version, written = found
      holder = Holder.decode(data)
      if holder is not None and holder.token == ours.token:  # a retried create had landed
        return Lock(store, ours, version, timeout_s)
      if holder.is_gone(timeout_s) if holder else time.time() - written > timeout_s:
        version = store.replace(ours.encode(), version)
        if version is not None:
          logging.warning('Took over %s from a run that is gone (%s).', store.path,
                          holder.describe() if holder else 'an unreadable lock file')
          return Lock(store, ours, version, timeout_s)
        # Else another process changed it first: read it again.
      elif holder is not None:
        raise errors.WorkdirInUseError(_in_use(store, name, holder, written))
    if time.monotonic() > deadline:  # unreadable all along, or taken over again and again
      raise errors.WorkdirInUseError(_in_use(store, name, holder, written))
    time.sleep(0.05)


@contextlib.contextmanager
def hold(directory: str | os.PathLike, name: str = LOCK_NAME, *, purpose: str = 'train',
         timeout_s: float = DEFAULT_TIMEOUT_S, enabled: bool = True) -> Iterator[Lock | None]:
  """The lock for the `with` block; None where `enabled` is False (other hosts of a run)."""
  if not enabled:
    yield None
    return
  lock = acquire(directory, name, purpose=purpose, timeout_s=timeout_s)
  try:
    yield lock
  finally:
    lock.release()


def live_holder(directory: str | os.PathLike, name: str = LOCK_NAME,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> Holder | None:
  """Who holds the lock now (None: nobody, or a holder that is gone): for reports."""
  found = lock_stores.store_for(directory, name).read()
  if found is None:
    return None
  holder = Holder.decode(found[0])
  return holder if holder is not None and not holder.is_gone(timeout_s) else None
