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
import signal
import threading
from typing import Any

import grain
import tensorflow_datasets as tfds
from absl import flags

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


def _options(data_config: Any) -> tuple[grain.ReadOptions, grain.MultiprocessingOptions | None]:
  workers = resolve(data_config.workers)
  # Threads per process: by default the host's cores shared by its processes.
  threads = resolve(data_config.threads) or max(1, host_cores() // max(workers, 1))
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=data_config.read_buffer)
  if not workers:
    return read, None
  return read, grain.MultiprocessingOptions(num_workers=workers,
                                            per_worker_buffer_size=data_config.worker_buffer)


def loader(dataset: grain.MapDataset, data_config: Any) -> grain.IterDataset:
  """`dataset` read with config.data's threads, buffers and worker processes (grain keeps
  the order whatever their number)."""
  read, workers = _options(data_config)
  iterable = dataset.to_iter_dataset(read)
  if not workers:
    return iterable
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (set by run.py's app.run)
    flags.FLAGS.mark_as_parsed()
  return iterable.mp_prefetch(workers, worker_init_fn=_ignore_interrupts)


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
  """Ctrl-C reaches every process of the terminal's group: the workers leave it to the
  trainer, which stops at a safe point and saves (they end when it closes the loader).
  They start with SIGINT blocked (`Batches`), so one sent meanwhile is dropped here."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Batches:
  """An iterator over `loader(dataset, data_config)`, to close() when done early.

  grain starts its worker processes while the first batch is fetched; that
  happens with SIGINT blocked in this thread (and so in the threads and
  processes started meanwhile), so that a Ctrl-C while a worker imports its
  modules cannot kill it with a KeyboardInterrupt: it reaches the trainer a
  moment later instead.
  """

  def __init__(self, dataset: grain.MapDataset, data_config: Any):
    self._iterator = iter(loader(dataset, data_config))
    self._guard = bool(resolve(data_config.workers)) and (
        threading.current_thread() is threading.main_thread())

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> Any:
    if not self._guard:
      return next(self._iterator)
    self._guard = False
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
      return next(self._iterator)
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

  def close(self) -> None:
    self._iterator.close()
