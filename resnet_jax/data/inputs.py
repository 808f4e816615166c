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


SHARED_MEMORY = '/dev/shm'  # where POSIX shared memory lives on Linux


def check_resources(data_config: Any, batch_bytes: int, eval_batch_bytes: int) -> None:
  """Worker counts, threads and buffers that this host's cores, memory or shared memory
  cannot hold are config errors (at start, not an out-of-memory kill an hour in).
  `batch_bytes`, `eval_batch_bytes`: the size of one of this host's batches."""
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
  needed = batches * batch_bytes
  available = _available_memory()
  if needed > available // 2:
    raise errors.ConfigError(
        f'config.data: {max(workers, 1)} workers x (worker_buffer {data_config.worker_buffer} + '
        f'read_buffer {data_config.read_buffer}) batches of {batch_bytes / 2**20:.1f} MiB take '
        f'{needed / 2**30:.1f} GiB, more than half of the {available / 2**30:.1f} GiB this host '
        'has available: lower the workers or buffers.')
  if workers:
    _check_shared_memory(workers, data_config.worker_buffer, batch_bytes + eval_batch_bytes)


def _check_shared_memory(workers: int, worker_buffer: int, pair_bytes: int) -> None:
  """grain keeps up to 2 x worker_buffer + 2 of a worker's batches in shared memory (its
  queue and the one it is putting there; the trainer's read-ahead queue and the one it is
  putting there) and the trainer one more in hand; the evaluation's loader runs while the
  training's is open, so both count (`pair_bytes`: one batch of each)."""
  needed = shared_memory_needed(workers, worker_buffer, pair_bytes)
  size = shared_memory_size()
  if needed > size:
    raise errors.ConfigError(
        f'config.data: the batches that {workers} workers keep in shared memory ((2 x '
        f'worker_buffer {worker_buffer} + 2) each and one in hand, for training and for the '
        f'evaluation beside it) take {needed / 2**20:.1f} MiB, more than {SHARED_MEMORY} holds '
        f'({size / 2**20:.1f} MiB): lower the workers or worker_buffer, or give the host more '
        'shared memory (a Docker container: --shm-size).')


def shared_memory_needed(workers: int, worker_buffer: int, pair_bytes: int) -> int:
  """Bytes of shared memory that `workers` grain workers' batches may take at once
  (`_check_shared_memory`)."""
  return (workers * (2 * worker_buffer + 2) + 1) * pair_bytes


def shared_memory_size() -> float:
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


def _bytes(shapes: dict[str, Any]) -> int:
  """Bytes of one example of uint8 (or bool) arrays of these shapes."""
  return sum(_bytes(v) if isinstance(v, dict) else math.prod(v) for v in shapes.values())


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
  eval_example = max(_bytes(host_preprocess.eval_shapes(data_config, crop))
                     for crop in (data_config.eval_crop, data_config.final_eval_crop) if crop)
  check_resources(data_config, (host_rows[1] - host_rows[0]) * size * size * 3,
                  local_eval_batch * eval_example)
  return Input(builder, splits, builders.num_classes(builder), batch_size, tuple(host_rows),
               steps_per_epoch, eval_steps, local_eval_batch, process_index, process_count)
