"""grain reading a data set of whole batches: threads, buffers and worker processes.

A worker process hands each batch to the trainer's process in shared memory.
grain copies an array into a new shared-memory block (`copy_to_shm`), and each
page of the block then faults in as the copy first touches it: 3.9 ms of CPU
for a 4.8 MB batch (32 x 224 x 224 x 3) on this machine, about a tenth of what
the batch costs to make. Written with one `os.pwrite`, the kernel allocates the
pages within the call: 2.0 ms. grain passes such a block on as it is and the
trainer's process unlinks it when done with it, as for its own copies.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
from multiprocessing import shared_memory
from typing import Any

import grain
import grain.multiprocessing
import jax
import numpy as np
from absl import flags

from resnet_jax import errors
from resnet_jax.data import inputs

# True in grain's worker processes only (set by `_init_worker`): there, and only there,
# a batch leaves in shared memory that the trainer's process unlinks. Elsewhere a block
# would have no owner (grain runs `mp_prefetch` in threads on free-threaded Python).
_in_worker = False


def _options(data_config: Any) -> tuple[grain.ReadOptions, grain.MultiprocessingOptions | None]:
  workers = inputs.resolve(data_config.workers)
  # Threads per process: by default the host's cores shared by its processes.
  threads = inputs.resolve(data_config.threads) or max(1, inputs.host_cores() // max(workers, 1))
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
  # In the worker's own loop, just before grain queues the batch: a block made earlier (in
  # the read threads) would be lost if the worker stopped while it sat in their buffer.
  return iterable.map(to_shared_memory).mp_prefetch(workers, worker_init_fn=_init_worker)


def to_shared_memory(batch: dict[str, Any]) -> dict[str, Any]:
  """In a grain worker, the batch's arrays in new shared-memory blocks, each written with
  one call; elsewhere the batch as it is."""
  if not _in_worker:
    return batch
  leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
  blocks: list[shared_memory.SharedMemory] = []
  try:
    out = [_to_block(path, leaf, blocks) for path, leaf in leaves]
  except BaseException:
    for block in blocks:  # this batch's, the one that failed too: the names go now, the
      block.unlink()      # memory with the last mapping (closed when collected)
    raise
  return jax.tree_util.tree_unflatten(treedef, out)


def _to_block(path: Any, leaf: Any, blocks: list[shared_memory.SharedMemory]) -> Any:
  """`leaf` in a new block (appended to `blocks`) if it is an array that grain's copy_to_shm
  would copy."""
  if (not isinstance(leaf, np.ndarray) or isinstance(leaf, grain.multiprocessing.SharedMemoryArray)
      or leaf.dtype.hasobject or not leaf.flags.c_contiguous or not leaf.size):
    return leaf
  try:
    block = shared_memory.SharedMemory(create=True, size=leaf.nbytes)
    blocks.append(block)
    fd = getattr(block, '_fd', -1)  # CPython's, on POSIX
    if fd < 0:
      np.copyto(np.ndarray(leaf.shape, leaf.dtype, buffer=block.buf), leaf)
    else:  # after a short write, the next call writes on (or fails: ENOSPC, /dev/shm is full)
      data, written = memoryview(leaf.reshape(-1).view(np.uint8)), 0
      while written < leaf.nbytes:
        written += os.pwrite(fd, data[written:], written)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise errors.ConfigError(
        f'{inputs.SHARED_MEMORY} is full: a grain worker could not hand over the '
        f'{jax.tree_util.keystr(path)} array of a batch ({leaf.nbytes / 2**20:.1f} MiB). Other '
        'programs, or the training and evaluation loaders together, fill its '
        f'{inputs.shared_memory_size() / 2**20:.1f} MiB: lower config.data.workers or '
        'worker_buffer, or give the host more shared memory (a Docker container: --shm-size).'
    ) from e
  return grain.multiprocessing.SharedMemoryArray.from_shared_memory(block, leaf.shape,
                                                                    leaf.dtype)


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Marks this process as a grain worker (`to_shared_memory`), and leaves Ctrl-C, which
  reaches every process of the terminal's group, to the trainer: it stops at a safe point
  and saves, and the workers end when it closes the loader. They start with SIGINT
  blocked (`Batches`), so one sent meanwhile is dropped here."""
  del worker_index, worker_count
  global _in_worker  # pylint: disable=global-statement
  _in_worker = True
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
    self._guard = bool(inputs.resolve(data_config.workers)) and (
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
