"""Why a checkpoint could not be read: its content is damaged, access was denied, or the
storage had a passing problem; and the checks that find damage the libraries miss.

The verdict decides what the trainer may do: only damaged content is moved
aside (checkpoint_quarantine.py); a permission, a credential or a storage outage never
is, however the library words it. Errors are classified by their Python
types and by the absl status code that starts tensorstore's messages, not by
free text where those exist. Each checkpoint also carries a CRC-32 of every
array (`checksums`): tensorstore decodes some corrupt compressed data without
an error, as other numbers.
"""
from __future__ import annotations

import errno
import json
import os
import re
import zlib
from typing import Any

import jax
import numpy as np
from etils import epath

from resnet_jax import errors
from resnet_jax import paths

CheckpointError = errors.CheckpointError

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

def status(error: BaseException) -> str | None:
  """The absl status code a tensorstore error starts with (`NOT_FOUND: ...`), if any."""
  if not isinstance(error, (ValueError, RuntimeError)):
    return None
  match = re.match(r'([A-Z_]{4,}): ', str(error).lstrip())
  return match.group(1) if match else None


def chain(error: BaseException | None):
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
  for e in chain(error):
    if access_denied(e):
      return None
    message = str(e)
    if (isinstance(e, _CONTENT_ERRORS) or status(e) in _CONTENT_STATUS or
        (isinstance(e, OSError) and e.errno == errno.ENOENT) or
        (isinstance(e, (KeyError, ValueError)) and any(m in message for m in _CONTENT_MARKERS))):
      return f'{type(e).__name__}: {summary(message)}'
  return None


def access_denied(error: BaseException) -> bool:
  """Whether the storage refused access (permissions, credentials) anywhere in the chain."""
  return any(isinstance(e, PermissionError) or status(e) in _ACCESS_STATUS
             for e in chain(error))


def transient(error: BaseException) -> bool:
  """Whether `error` looks like storage or memory trouble that may pass (worth a retry)."""
  return isinstance(error, _TRANSIENT_ERRORS) or status(error) in _TRANSIENT_STATUS


def first_line(message: str) -> str:
  return (message.strip().strip('"\'').splitlines() or [''])[0][:1000]


def summary(message: str) -> str:
  """tensorstore's long error chains cut to the status, the innermost file and what failed."""
  message = first_line(message.split(' [tensorstore_spec')[0] + '\n')
  files = re.findall(r'file "([^"]+)"', message)
  if not files:
    return message
  status = re.match(r'([A-Z_]+): ', message)
  detail = message.rsplit(f'{files[-1]}"', 1)[1].lstrip(': ')
  return f'{status.group(1) + ": " if status else ""}{files[-1]}: {detail}'[:300]



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
      why = f'{type(error).__name__}: {first_line(str(error))}'
    super().__init__(f'The checkpoint {step_dir} cannot be read: access was denied ({why}). '
                     'Nothing was moved or deleted: fix its permissions (or credentials) and '
                     'rerun the same command.')


def raise_classified(step_dir: epath.Path, error: Exception) -> None:
  """A restore's error as what it means: damaged content, or access denied."""
  if access_denied(error):
    raise CheckpointAccessError(step_dir, error) from error
  why = content_damage(error)
  if why is not None:
    raise DamagedCheckpointError(step_dir, why) from error


def path_name(path: tuple[Any, ...]) -> str:
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def differences(saved: Any, abstract: Any) -> list[str]:
  """Where the saved arrays and the expected ones differ in name or shape."""
  shapes = lambda tree: {path_name(p): tuple(x.shape) for p, x in
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
  return {path_name(path): zlib.crc32(np.ascontiguousarray(
      np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)).view(np.uint8))
          for path, x in leaves}


def verify(step_dir: epath.Path, state: Any, saved: dict[str, int] | None) -> None:
  """Restored arrays whose bytes differ from those saved make the checkpoint damaged
  (checkpoints written before checksums were saved are not checked)."""
  if saved is None:
    return
  wrong = sorted(name for name, crc in checksums(state).items() if saved.get(name) != crc)
  if wrong:
    raise DamagedCheckpointError(
        step_dir, f'{len(wrong)} arrays differ from the checksums saved with them, e.g. '
        f'{", ".join(wrong[:3])}')


def check_readable(step_dir: epath.Path) -> None:
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
