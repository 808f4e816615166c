"""The one path layer for everything a run reads and writes in a workdir.

Workdirs on TPU VMs are `gs://` buckets (the VM's disk goes with the VM), so
every file (config.json, metrics.jsonl, checkpoints, eval results, sweep
summaries, figures) goes through etils `epath`, which orbax uses too: local
paths and `gs://` paths behave alike. Local paths are made absolute (orbax
needs that); remote ones are kept as given.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

from etils import epath

from resnet_jax import errors

try:  # gs:// without TensorFlow goes through gcsfs (fsspec), whose directory listings are
  # cached per process: checkpoints that orbax writes through tensorstore would not show.
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)
except ImportError:
  pass


def is_remote(path: str | os.PathLike) -> bool:
  return '://' in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
  """An epath for `path`: `gs://...` as given, a local path made absolute."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(os.path.expanduser(path)))


def make_workdir(path: epath.Path) -> None:
  """Creates the workdir; one that is a file or may not be written is a clear error."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not is_remote(path) and not path.is_dir():  # (gs:// has no directories to check)
      raise FileExistsError(path)
  except (FileExistsError, NotADirectoryError):
    raise errors.ConfigError(f'--workdir={path} is a file (or lies under one), not a '
                             'directory: pick another --workdir.') from None
  except PermissionError as e:
    raise errors.ConfigError(f'--workdir={path} cannot be created ({e.strerror}): pick a '
                             'directory you may write to.') from None
  if not is_remote(path) and not os.access(path, os.W_OK | os.X_OK):
    raise errors.ConfigError(f'--workdir={path} is not writable by this user: fix its '
                             'permissions or pick another --workdir.')


def append_line(path: epath.Path, line: str) -> None:
  """Adds a line to a small text file (gs:// objects cannot be appended to: rewritten)."""
  old = path.read_text() if path.exists() else ''
  path.write_text(old + line.rstrip('\n') + '\n')


def write_json(path: epath.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2, sort_keys=True) + '\n')


def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def save_figure(figure: Any, path: epath.Path, dpi: int = 120) -> None:
  """matplotlib's savefig into any path (it writes local files only)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format=path.suffix.lstrip('.') or 'png', dpi=dpi)
  path.write_bytes(buffer.getvalue())
