"""resnet_jax/data/loading.py: grain's worker processes hand batches over in shared memory,
written in one call, and none is left behind; shared memory the workers cannot fit is a
config error."""
import errno
import gc
import os
import re
import signal
import time
from multiprocessing import shared_memory
from typing import Callable
from unittest import mock

import grain.multiprocessing
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import errors
from resnet_jax.data import inputs
from resnet_jax.data import loading
from resnet_jax.data import train_stream
from tests.support import helpers

SharedMemoryArray = grain.multiprocessing.SharedMemoryArray


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


def _eventually(condition: Callable[[], bool]) -> bool:
  """Whether `condition()` holds within 5 s: grain may unlink blocks in a thread of its own
  (`SharedMemoryArray.enable_async_del`)."""
  for _ in range(50):
    if condition():
      return True
    time.sleep(0.1)
  return condition()


def _photos_config(photos_dir: str, workers: int):
  """Crops of 36 x 36 in batches of 6: blocks of a size no other test makes."""
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


class _Created:
  """Records the names of the shared-memory blocks made while it is active (other tests,
  in this process or another, make blocks of their own meanwhile)."""

  def __init__(self):
    names = self.names = []

    class Recorded(shared_memory.SharedMemory):
      def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get('create'):
          names.append(self.name)
    self._patch = mock.patch.object(shared_memory, 'SharedMemory', Recorded)

  def __enter__(self) -> '_Created':
    self._patch.start()
    return self

  def __exit__(self, *exc) -> None:
    self._patch.stop()

  def all_gone(self) -> bool:
    return not any(os.path.exists(os.path.join(inputs.SHARED_MEMORY, n)) for n in self.names)


def _in_a_worker():
  return mock.patch.object(loading, '_in_worker', True)


def test_the_worker_start_marks_the_process_and_leaves_ctrl_c_to_the_trainer():
  handler = signal.getsignal(signal.SIGINT)
  try:
    with mock.patch.object(loading, '_in_worker', False):
      loading._init_worker(0, 2)  # pylint: disable=protected-access
      assert loading._in_worker  # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, handler)


def test_to_shared_memory_writes_arrays_into_blocks_in_a_worker_only():
  batch = {'image': np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3),
           'label': np.array([3, 1], np.int32),
           'scales': {'224': {'valid': np.array([True, False])}},
           'logits': np.array([1.5, -2.25], jnp.bfloat16),
           'key': np.array(['a', 'b'], object), 'view': np.zeros((4, 4))[:, ::2]}
  assert loading.to_shared_memory(batch) is batch  # in the trainer's own process
  with _in_a_worker(), _Created() as created, \
       mock.patch.object(os, 'pwrite', wraps=os.pwrite) as pwrite:
    shared = loading.to_shared_memory(batch)
  assert pwrite.call_count == len(created.names) == 4  # one block, one call per array
  for key in ('image', 'label', 'logits'):
    assert isinstance(shared[key], SharedMemoryArray)
    assert shared[key].dtype == batch[key].dtype
    np.testing.assert_array_equal(shared[key], batch[key])
  np.testing.assert_array_equal(shared['scales']['224']['valid'], [True, False])
  assert shared['key'] is batch['key'] and shared['view'] is batch['view']  # left to grain
  # As the trainer's process receives them: equal, and unlinked when dropped.
  received = [SharedMemoryArray.from_metadata(leaf.metadata) for leaf in (
      shared['image'], shared['label'], shared['logits'], shared['scales']['224']['valid'])]
  for array in received:
    array.unlink_on_del()
  np.testing.assert_array_equal(received[0], batch['image'])
  del received, shared, array
  gc.collect()
  assert _eventually(created.all_gone)


def test_short_writes_go_on_where_they_stopped():
  image = np.random.default_rng(0).integers(0, 256, (3, 7, 11, 3), np.uint8)
  real = os.pwrite
  with _in_a_worker(), _Created() as created, \
       mock.patch.object(os, 'pwrite', lambda fd, data, at: real(fd, data[:100], at)):
    shared = loading.to_shared_memory({'image': image})['image']
  shared.unlink_on_del()
  np.testing.assert_array_equal(shared, image)
  del shared
  gc.collect()
  assert _eventually(created.all_gone)


@pytest.mark.parametrize('writes', [
    [OSError(errno.ENOSPC, 'No space left on device')],  # the image at once
    [100, OSError(errno.ENOSPC, 'No space left on device')],  # after a short write
    [693, OSError(errno.ENOSPC, 'No space left on device')],  # the label, the image written
])
def test_full_shared_memory_is_a_config_error_and_leaves_no_block(writes):
  batch = {'image': np.ones((3, 7, 11, 3), np.uint8), 'label': np.arange(3, dtype=np.int32)}
  failed = 'label' if writes[0] == 693 else 'image'
  with _in_a_worker(), _Created() as created, \
       mock.patch.object(os, 'pwrite', side_effect=writes), \
       pytest.raises(errors.ConfigError, match=re.escape(
           f"/dev/shm is full: a grain worker could not hand over the ['{failed}'] array of a "
           'batch (0.0 MiB). Other programs, or the training and evaluation loaders together, '
           'fill its ')) as raised:
    loading.to_shared_memory(batch)
  assert 'lower config.data.workers or worker_buffer, or give the host more shared memory' in (
      str(raised.value))
  assert len(created.names) == (2 if failed == 'label' else 1)
  assert created.all_gone()


def test_workers_whose_batches_do_not_fit_in_shared_memory_are_a_config_error(digits_dir):
  """The training loader's batches and the evaluation's beside it: (2 x 10 + 2) x 2 + 1 =
  45 of each, 16 x 32 x 32 x 3 and 40 x 32 x 32 x 3 bytes: 7.4 MiB."""
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.workers': 2,
                                   'data.worker_buffer': 10})

  def create():
    return inputs.create_input(config.data, batch_size=16, eval_batch_size=40,
                               host_rows=(0, 16))
  with mock.patch.object(inputs, 'shared_memory_size', return_value=7 * 2**20):
    with pytest.raises(errors.ConfigError, match=re.escape(
        'config.data: the batches that 2 workers keep in shared memory ((2 x worker_buffer 10 + '
        '2) each and one in hand, for training and for the evaluation beside it) take 7.4 MiB, '
        'more than /dev/shm holds (7.0 MiB): lower the workers or worker_buffer')):
      create()
    config.data.worker_buffer = 9  # 41 of each: 6.7 MiB
    create()
    config.data.worker_buffer, config.data.final_eval_crop = 9, 'ten_crop'  # 10 crops: 50.0 MiB
    with pytest.raises(errors.ConfigError, match=re.escape('take 50.0 MiB')):
      create()
    config.data.workers = 0  # no workers, no shared memory
    create()
