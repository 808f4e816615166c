"""What the trainer needs to know about its data: splits, sizes, this host's rows.

The global batch at step s is a pure function of (seed, s) (`train_stream`);
each host reads only its rows of it, `host_rows`: the rows its devices hold
in the batch sharding. So 1 host x 8 devices, 2 hosts x 4 and 1 host x 1
train on exactly the same global batches. Evaluation splits the eval split
into one contiguous part per host.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any

import tensorflow_datasets as tfds

from resnet_jax import errors
from resnet_jax.data import builders
from resnet_jax.data import host_preprocess


@dataclasses.dataclass(frozen=True)
class Input:
  builder: tfds.core.DatasetBuilder
  splits: builders.Splits
  num_classes: int
  batch_size: int                 # global
  host_rows: tuple[int, int]      # [start, stop) of the global batch that this host reads
  steps_per_epoch: int
  eval_steps: int
  local_eval_batch_size: int
  process_index: int
  process_count: int

  @property
  def local_batch_size(self) -> int:
    return self.host_rows[1] - self.host_rows[0]


def derive_seed(*parts: Any) -> int:
  """A 31-bit seed from any parts (the run's seed and a purpose), stable across versions."""
  digest = hashlib.sha256('/'.join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:7], 'little') % 2**31


def host_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def check_resources(data_config: Any, local_batch_size: int, bytes_per_example: int) -> None:
  """Worker counts, threads and buffers that this host's cores or memory cannot hold are
  config errors (at start, not an out-of-memory kill an hour in)."""
  cores = host_cores()
  for field in ('workers', 'threads'):
    value = data_config[field]
    if value < -1 or value > 4 * cores:
      raise errors.ConfigError(
          f'config.data.{field}={value}: this host has {cores} cores; use 0 to {4 * cores} '
          '(-1: one per core).')
  for field in ('worker_buffer', 'read_buffer'):
    if data_config[field] < 1:
      raise errors.ConfigError(f'config.data.{field}={data_config[field]}: give at least 1 batch.')
  workers = resolve(data_config.workers)
  batches = max(workers, 1) * (data_config.worker_buffer + data_config.read_buffer)
  needed = batches * local_batch_size * bytes_per_example
  available = _available_memory()
  if needed > available // 2:
    raise errors.ConfigError(
        f'config.data: {max(workers, 1)} workers x (worker_buffer {data_config.worker_buffer} + '
        f'read_buffer {data_config.read_buffer}) batches of {local_batch_size} images take '
        f'{needed / 2**30:.1f} GiB, more than half of the {available / 2**30:.1f} GiB this host '
        'has available: lower the workers or buffers.')
  # A worker's batches wait in shared memory: in its queue, in the trainer's read-ahead
  # (grain keeps worker_buffer of each worker's) and one in hand.
  blocks = workers * (2 * data_config.worker_buffer + 1)
  shared, shared_size = blocks * local_batch_size * bytes_per_example, _shared_memory_size()
  if workers and shared > shared_size:
    raise errors.ConfigError(
        f'config.data: {workers} workers x (2 x worker_buffer {data_config.worker_buffer} + 1) '
        f'batches of {local_batch_size} images wait in shared memory, {shared / 2**20:.0f} '
        f'MiB, more than {SHARED_MEMORY} holds ({shared_size / 2**20:.0f} MiB): lower the '
        'workers or worker_buffer, or give the host more shared memory (a Docker container: '
        '--shm-size).')


SHARED_MEMORY = '/dev/shm'  # where POSIX shared memory lives on Linux


def _shared_memory_size() -> float:
  """Bytes of POSIX shared memory (a Docker container's default: 64 MiB), or inf where
  there is no /dev/shm to ask."""
  try:
    stat = os.statvfs(SHARED_MEMORY)
  except OSError:
    return math.inf
  return stat.f_blocks * stat.f_frsize


def _available_memory() -> int:
  """Bytes the host can give without swapping: MemAvailable (free memory and the page cache
  it can drop), or free memory where /proc/meminfo is missing."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def resolve(count: int) -> int:
  """A worker or thread count, -1 meaning one per core."""
  return host_cores() if count == -1 else count


def create_input(data_config: Any, *, batch_size: int, eval_batch_size: int,
                 host_rows: tuple[int, int], process_index: int = 0,
                 process_count: int = 1) -> Input:
  """Resolves the data set, splits and batch sizes; fails early on bad input."""
  if batch_size < 1 or eval_batch_size < 1:
    raise errors.ConfigError(f'batch_size={batch_size} and eval_batch_size={eval_batch_size} '
                             'must be positive.')
  if eval_batch_size % process_count:
    raise errors.ConfigError(f'eval_batch_size={eval_batch_size} must be divisible by the '
                             f'{process_count} hosts.')
  host_preprocess.check_train_augment(data_config)
  builder = builders.get_builder(data_config)
  splits = builders.get_splits(builder, data_config)
  steps_per_epoch = splits.num_train // batch_size
  if steps_per_epoch < 1:
    raise errors.ConfigError(f'The train split {splits.train!r} has {splits.num_train} examples, '
                             f'fewer than one global batch of {batch_size}: lower '
                             'config.batch_size.')
  local_eval_batch = eval_batch_size // process_count
  eval_steps = math.ceil(math.ceil(splits.num_eval / process_count) / local_eval_batch)
  size = data_config.image_size
  check_resources(data_config, host_rows[1] - host_rows[0], size * size * 3)
  return Input(builder, splits, builders.num_classes(builder), batch_size, tuple(host_rows),
               steps_per_epoch, eval_steps, local_eval_batch, process_index, process_count)
