"""workdir_lock: one run per workdir, on local paths and on gs:// (the GCS emulator)."""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import secrets
import socket
import subprocess
import sys
import time
from typing import Callable

import pytest

from resnet_jax import errors, workdir_lock
from tests.support import helpers


@dataclasses.dataclass
class Place:
  """A workdir and direct access to its lock file, behind workdir_lock's back."""
  directory: str
  write: Callable[[bytes], None]
  read: Callable[[], bytes | None]

  @property
  def lock(self) -> str:
    return f'{self.directory}/LOCK'

  def holder(self) -> dict | None:
    data = self.read()
    return None if data is None else json.loads(data)


@pytest.fixture(params=['local', 'gs'])
def place(request, tmp_path) -> Place:
  if request.param == 'local':
    directory = str(tmp_path / 'workdir')
    lock = os.path.join(directory, 'LOCK')

    def write(data: bytes) -> None:
      os.makedirs(directory, exist_ok=True)
      with open(lock, 'wb') as f:
        f.write(data)

    def read() -> bytes | None:
      try:
        with open(lock, 'rb') as f:
          return f.read()
      except FileNotFoundError:
        return None
    return Place(directory, write, read)

  request.getfixturevalue('gcs_env')  # skips where the emulator cannot run
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  prefix = f'locks/{secrets.token_hex(4)}'
  bucket = storage.Client().bucket('bucket')

  def write_gcs(data: bytes) -> None:
    bucket.blob(f'{prefix}/LOCK').upload_from_string(data)

  def read_gcs() -> bytes | None:
    blob = bucket.get_blob(f'{prefix}/LOCK')  # a Blob that holds a generation reads only that one
    return None if blob is None else blob.download_as_bytes()
  return Place(f'gs://bucket/{prefix}', write_gcs, read_gcs)


def _record(host: str | None = None, pid: int | None = None, heartbeat_age: float = 0.0) -> bytes:
  """A lock file of another run: this host and a live pid unless told otherwise."""
  now = time.time()
  return json.dumps({'host': host or socket.gethostname(), 'pid': pid or os.getppid(),
                     'purpose': 'train', 'started': '', 'started_epoch': now - 3600,
                     'heartbeat': '', 'heartbeat_epoch': now - heartbeat_age,
                     'token': 'theirs'}).encode()


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, '-c', ''])
  process.wait()
  return process.pid


def test_acquire_then_a_second_acquire_is_refused_naming_the_holder(place):
  lock = workdir_lock.acquire(place.directory)
  record = place.holder()
  assert (record['host'], record['pid'], record['token']) == (
      socket.gethostname(), os.getpid(), lock.holder.token)
  assert record['started'].startswith(time.strftime('%Y-', time.gmtime(record['started_epoch'])))
  with pytest.raises(errors.WorkdirInUseError) as refused:
    workdir_lock.acquire(place.directory)
  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(record['started_epoch']))
  assert str(refused.value).startswith(
      f'{place.directory} is in use by another run (train): host {socket.gethostname()}, '
      f'pid {os.getpid()}, started {started}, last heartbeat ')
  assert str(refused.value).endswith(f'(lock file {place.lock}). Wait for it to finish, or '
                                     f'stop it; if it is gone (e.g. its machine died), delete '
                                     f'{place.lock}.')
  lock.release()
  assert place.read() is None
  lock.release()  # idempotent
  workdir_lock.acquire(place.directory).release()


def test_hold_releases_on_exit_and_holds_nothing_where_disabled(place):
  with pytest.raises(KeyError):
    with workdir_lock.hold(place.directory) as lock:
      assert place.holder()['token'] == lock.holder.token
      raise KeyError('the run failed')
  assert place.read() is None
  with workdir_lock.hold(place.directory, enabled=False) as lock:
    assert lock is None and place.read() is None


def test_a_run_in_another_process_is_refused(place):
  script = ('import sys\nfrom resnet_jax import errors, workdir_lock\n'
            f'try:\n  workdir_lock.acquire({place.directory!r})\n'
            'except errors.WorkdirInUseError as e:\n  print(e)\n  sys.exit(3)\n')
  with workdir_lock.hold(place.directory):
    refused = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                             cwd=helpers.REPO, timeout=120, check=False)
  assert refused.returncode == 3, refused.stderr
  assert f'host {socket.gethostname()}, pid {os.getpid()}, started ' in refused.stdout


def test_a_named_lock_is_separate_from_the_workdir_lock(place):
  with workdir_lock.hold(place.directory), workdir_lock.hold(place.directory, name='member-3'):
    with pytest.raises(errors.WorkdirInUseError, match=f'^member-3 in {place.directory} is in use'):
      workdir_lock.acquire(place.directory, name='member-3')


def test_a_dead_pid_on_this_host_is_taken_over(place):
  place.write(_record(pid=_dead_pid()))
  with workdir_lock.hold(place.directory) as lock:
    assert place.holder()['token'] == lock.holder.token


def test_another_host_is_gone_only_when_its_heartbeat_is_stale(place):
  place.write(_record(host='other-host', pid=1, heartbeat_age=60))
  with pytest.raises(errors.WorkdirInUseError, match='host other-host, pid 1, .* 60 s ago'):
    workdir_lock.acquire(place.directory, timeout_s=600)
  assert place.holder()['token'] == 'theirs'
  place.write(_record(host='other-host', pid=1, heartbeat_age=601))
  with workdir_lock.hold(place.directory, timeout_s=600) as lock:
    assert place.holder()['token'] == lock.holder.token


def test_a_lock_taken_over_by_another_run_is_lost_and_left_in_place(place, caplog):
  lock = workdir_lock.acquire(place.directory)
  place.write(_record())
  with caplog.at_level(logging.WARNING):
    lock.release()
  assert place.holder()['token'] == 'theirs'
  assert 'deleted or taken over by another run: left as it is' in caplog.text


def test_the_heartbeat_thread_refreshes_and_notices_a_takeover(place):
  with workdir_lock.hold(place.directory, timeout_s=0.4) as lock:
    first = place.holder()['heartbeat_epoch']
    deadline = time.time() + 10
    while place.holder()['heartbeat_epoch'] == first:
      assert time.time() < deadline, 'no heartbeat'
      time.sleep(0.02)
    assert place.holder()['token'] == lock.holder.token and not lock.lost
    place.write(_record())
    while not lock.lost:
      assert time.time() < deadline, 'the takeover went unnoticed'
      time.sleep(0.02)
  assert place.holder()['token'] == 'theirs'


def _race(directory: str, start, results, done) -> None:
  start.wait()
  try:
    lock = workdir_lock.acquire(directory)
  except errors.WorkdirInUseError:
    results.put('refused')
    return
  results.put('won')
  done.wait(60)
  lock.release()


def test_of_processes_racing_for_a_stale_lock_exactly_one_wins(place):
  context = multiprocessing.get_context('fork')
  for _ in range(3):
    place.write(_record(pid=_dead_pid()))
    start, done, results = context.Barrier(4), context.Event(), context.Queue()
    racers = [context.Process(target=_race, args=(place.directory, start, results, done))
              for _ in range(4)]
    for racer in racers:
      racer.start()
    try:
      outcomes = sorted(results.get(timeout=60) for _ in racers)
    finally:
      done.set()
      for racer in racers:
        racer.join(60)
    assert outcomes == ['refused', 'refused', 'refused', 'won']
    assert place.read() is None


def test_an_unreadable_lock_file_is_respected_until_it_is_old(tmp_path, monkeypatch):
  """A run that died between creating its lock file and writing it."""
  monkeypatch.setattr(workdir_lock, '_SETTLE_S', 0.2)
  lock = tmp_path / 'LOCK'
  lock.write_bytes(b'')
  with pytest.raises(errors.WorkdirInUseError, match=f'its lock file {lock} cannot be read'):
    workdir_lock.acquire(tmp_path)
  os.utime(lock, (time.time() - 601, time.time() - 601))
  with workdir_lock.hold(tmp_path):
    assert json.loads(lock.read_bytes())['pid'] == os.getpid()
  assert os.listdir(tmp_path) == []


def test_other_remote_filesystems_are_refused():
  with pytest.raises(errors.ConfigError, match='needs a local path or gs://'):
    workdir_lock.acquire('s3://bucket/run')
