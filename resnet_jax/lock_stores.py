"""Where a workdir lock lives: one small file with compare-and-swap, locally or on GCS.

- gs://: object generations (create with if_generation_match=0, replace and
  delete with the generation read);
- local (or shared) filesystems: create with O_CREAT|O_EXCL; a replace or
  delete first creates `<lock>.swap-<hash of the content it read>` with
  O_EXCL, so of those that read the same content only one may change it, and
  only while the content is still that.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from typing import Any, Iterator, Protocol

from resnet_jax import errors, paths


class Store(Protocol):
  """One lock file with compare-and-swap: `version` is what a change must still find."""
  path: str  # as a user would write it

  def create(self, data: bytes) -> Any | None:
    """The new version, or None where the file exists."""

  def read(self) -> tuple[bytes, Any, float] | None:
    """(content, version, epoch last written), or None where there is no file."""

  def replace(self, data: bytes, version: Any) -> Any | None:
    """The new version, or None where the file is no longer at `version`."""

  def delete(self, version: Any) -> bool:
    """Whether the file was at `version` and is gone."""


class LocalStore:
  """A file on a local or shared filesystem; its content is its version."""

  def __init__(self, path: str):
    self.path = path

  def create(self, data: bytes) -> bytes | None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return None
    try:
      os.write(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    return data

  def read(self) -> tuple[bytes, bytes, float] | None:
    try:
      with open(self.path, 'rb') as f:
        data = f.read()
        return data, data, os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
      return None

  @contextlib.contextmanager
  def _swap(self, version: bytes) -> Iterator[bool]:
    """Whether this process alone may change the file, which is still at `version`."""
    swap = f'{self.path}.swap-{hashlib.sha256(version).hexdigest()[:16]}'
    try:
      os.close(os.open(swap, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
      yield False
      return
    try:
      current = self.read()
      yield current is not None and current[0] == version
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(swap)

  def replace(self, data: bytes, version: bytes) -> bytes | None:
    with self._swap(version) as exclusive:
      if not exclusive:
        return None
      temporary = f'{self.path}.tmp-{secrets.token_hex(8)}'
      with open(temporary, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(temporary, self.path)
      return data

  def delete(self, version: bytes) -> bool:
    with self._swap(version) as exclusive:
      if exclusive:
        os.unlink(self.path)
      return exclusive


class GcsStore:
  """An object in a bucket; its generation is its version."""

  def __init__(self, url: str):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    self.path = url
    bucket, _, self._name = url[len('gs://'):].partition('/')
    # STORAGE_EMULATOR_HOST set: anonymous, against the emulator; else default credentials.
    self._bucket = storage.Client().bucket(bucket)
    self._changed = (exceptions.PreconditionFailed, exceptions.NotFound)

  def _upload(self, data: bytes, generation: int) -> int | None:
    blob = self._bucket.blob(self._name)
    try:
      blob.upload_from_string(data, content_type='application/json',
                              if_generation_match=generation)
    except self._changed:
      return None
    return blob.generation

  def create(self, data: bytes) -> int | None:
    return self._upload(data, 0)

  def read(self) -> tuple[bytes, int, float] | None:
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None
    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation)
    except self._changed:  # changed since: read it again
      return None
    return data, blob.generation, blob.updated.timestamp()

  def replace(self, data: bytes, version: int) -> int | None:
    return self._upload(data, version)

  def delete(self, version: int) -> bool:
    # The precondition alone would do on GCS; the emulator ignores it on deletes.
    current = self._bucket.get_blob(self._name)
    if current is None or current.generation != version:
      return False
    try:
      self._bucket.blob(self._name).delete(if_generation_match=version)
    except self._changed:
      return False
    return True


def store_for(directory: str | os.PathLike, name: str) -> Store:
  directory = os.fspath(directory)
  if directory.startswith('gs://'):
    return GcsStore(f'{directory.rstrip("/")}/{name}')
  if paths.is_remote(directory):
    raise errors.ConfigError(f'{directory}: a workdir lock needs a local path or gs://; '
                             'use one of those for the workdir.')
  return LocalStore(os.path.join(str(paths.workdir_path(directory)), name))
