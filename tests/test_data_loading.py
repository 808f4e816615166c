"""resnet_jax/data/loading.py: grain's worker processes hand batches over in shared memory,
written in one call, and none is left behind; shared memory the workers cannot fit is a
config error."""
import errno
import gc
import os
import re
import time
from unittest import mock

import numpy as np
import pytest
from grain._src.python.ipc import shared_memory_array

from resnet_jax import errors
from resnet_jax.data import inputs
from resnet_jax.data import loading
from resnet_jax.data import train_stream
from tests.support import helpers

SharedMemoryArray = shared_memory_array.SharedMemoryArray


def _blocks(size: int) -> set[str]:
  """The shared-memory blocks of exactly `size` bytes (other tests' blocks have other sizes)."""
  found = set()
  for name in os.listdir(inputs.SHARED_MEMORY):
    try:
      path = os.path.join(inputs.SHARED_MEMORY, name)
      if name.startswith('psm_') and os.stat(path).st_size == size:
        found.add(name)
    except FileNotFoundError:  # unlinked meanwhile
      pass
  return found


def _eventually(condition) -> bool:
  """Whether `condition()` holds within 5 s: grain may unlink blocks in a thread of its own
  (`SharedMemoryArray.enable_async_del`)."""
  for _ in range(50):
    if condition():
      return True
    time.sleep(0.1)
  return condition()


def _photos_config(photos_dir, workers):
  return helpers.small_config(**{
      'data.name': 'sample_photos', 'data.data_dir': photos_dir, 'data.train_augment': 'scale',
      'data.image_size': 36, 'data.scale_range': (40, 48), 'data.normalize': 'imagenet_mean',
      'batch_size': 6, 'eval_batch_size': 6, 'data.workers': workers, 'data.worker_buffer': 2})


@pytest.mark.skipif(not os.path.isdir(inputs.SHARED_MEMORY), reason='no /dev/shm to look in')
def test_worker_batches_arrive_in_shared_memory_and_none_is_left_behind(photos_dir):
  size = 6 * 36 * 36 * 3  # one batch of images: a size no other test's block has
  before = _blocks(size)
  config = _photos_config(photos_dir, workers=2)
  inp = inputs.create_input(config.data, batch_size=6, eval_batch_size=6, host_rows=(0, 6))
  iterator = train_stream.train_iterator(config.data, inp, seed=3)
  got = [next(iterator) for _ in range(4)]
  assert all(isinstance(b['image'], SharedMemoryArray) for b in got)
  assert len(_blocks(size) - before) >= 4  # these, and the batches that wait for their turn
  iterator.close()
  config.data.workers = 0
  in_process = list(train_stream.train_iterator(config.data, inp, seed=3, num_steps=4))
  for a, b in zip(got, in_process):
    assert not isinstance(b['image'], SharedMemoryArray)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  del got, a
  gc.collect()
  assert _eventually(lambda: not _blocks(size) - before)  # unlinked as their arrays went


def test_to_shared_memory_writes_arrays_into_blocks_in_a_worker_only():
  batch = {'image': np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3),
           'label': np.array([3, 1], np.int32),
           'scales': {'224': {'valid': np.array([True, False])}},
           'key': np.array(['a', 'b'], object), 'view': np.zeros((4, 4))[:, ::2]}
  assert loading.to_shared_memory(batch) is batch  # in the trainer's own process
  with mock.patch.object(loading, '_in_worker', True), \
       mock.patch.object(os, 'pwrite', wraps=os.pwrite) as pwrite:
    shared = loading.to_shared_memory(batch)
  assert pwrite.call_count == 3  # one call per array
  for leaf in (shared['image'], shared['label'], shared['scales']['224']['valid']):
    assert isinstance(leaf, SharedMemoryArray)
  assert shared['key'] is batch['key'] and shared['view'] is batch['view']  # left to grain
  # As the trainer's process receives it: equal, and unlinked when dropped.
  received = SharedMemoryArray.from_metadata(shared['image'].metadata)
  received.unlink_on_del()
  np.testing.assert_array_equal(received, batch['image'])
  name = received.shm.name
  for leaf in (shared['label'], shared['scales']['224']['valid']):
    leaf.unlink_on_del()
  del received, shared, leaf
  gc.collect()
  if os.path.isdir(inputs.SHARED_MEMORY):
    assert _eventually(lambda: not os.path.exists(os.path.join(inputs.SHARED_MEMORY, name)))


def test_short_writes_go_on_where_they_stopped():
  image = np.random.default_rng(0).integers(0, 256, (3, 7, 11, 3), np.uint8)
  real = os.pwrite
  with mock.patch.object(loading, '_in_worker', True), \
       mock.patch.object(os, 'pwrite', lambda fd, data, at: real(fd, data[:100], at)):
    shared = loading.to_shared_memory({'image': image})['image']
  shared.unlink_on_del()
  np.testing.assert_array_equal(shared, image)


def test_full_shared_memory_is_a_config_error_and_leaves_no_block():
  image = np.ones((3, 7, 11, 3), np.uint8)
  before = _blocks(image.nbytes) if os.path.isdir(inputs.SHARED_MEMORY) else set()
  full = OSError(errno.ENOSPC, 'No space left on device')
  for writes in ([full], [100, full]):  # at once, or after a short write
    with mock.patch.object(loading, '_in_worker', True), \
         mock.patch.object(os, 'pwrite', side_effect=writes), \
         pytest.raises(errors.ConfigError,
                       match=re.escape('/dev/shm is full: a grain worker could not hand over a '
                                       'batch of 0.0 MiB. Lower config.data.workers or '
                                       'worker_buffer, or give the host more shared memory')):
      loading.to_shared_memory({'image': image})
  if os.path.isdir(inputs.SHARED_MEMORY):
    assert _blocks(image.nbytes) == before


def test_workers_whose_batches_do_not_fit_in_shared_memory_are_a_config_error(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.workers': 2,
                                   'data.worker_buffer': 10})
  create = lambda: inputs.create_input(config.data, batch_size=16, eval_batch_size=40,  # noqa: E731
                                       host_rows=(0, 16))
  # 2 workers x (2 x 10 + 1) batches of 16 x 32 x 32 x 3 bytes: 2.0 MiB.
  with mock.patch.object(inputs, '_shared_memory_size', return_value=2**20):
    with pytest.raises(errors.ConfigError, match=re.escape(
        'config.data: 2 workers x (2 x worker_buffer 10 + 1) batches of 16 images wait in '
        'shared memory, 2 MiB, more than /dev/shm holds (1 MiB)')):
      create()
    config.data.worker_buffer = 4  # 18 batches: 0.84 MiB
    create()
    config.data.workers, config.data.worker_buffer = 0, 10  # no workers, no shared memory
    create()
