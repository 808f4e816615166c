"""resnet_jax/data inputs, train_stream and eval_stream: shapes, hosts, determinism, resume."""
import hashlib
import io
import re
from unittest import mock

import numpy as np
import pytest

from resnet_jax import errors
from resnet_jax.data import eval_stream
from resnet_jax.data import inputs
from resnet_jax.data import normalization
from resnet_jax.data import sources
from resnet_jax.data import train_stream
from tests.support import helpers


def _input(config, host=0, hosts=1):
  """The Input of simulated host `host` of `hosts`, each holding an equal part of the batch."""
  rows = config.batch_size // hosts
  return inputs.create_input(config.data, batch_size=config.batch_size,
                             eval_batch_size=config.eval_batch_size,
                             host_rows=(host * rows, (host + 1) * rows), process_index=host,
                             process_count=hosts)


def _batches(config, inp, start_step=0, num=1):
  return list(train_stream.train_iterator(config.data, inp, seed=config.seed,
                                          start_step=start_step, num_steps=num))


def _ids(images):
  return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]


def test_digits_shapes_dtypes_and_grey_becomes_rgb(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 8,
                                   'data.train_augment': 'pad_crop'})
  inp = _input(config)
  (batch,) = _batches(config, inp)
  assert inp.num_classes == 10 and inp.steps_per_epoch == 1437 // 8
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  # On the devices: [0, 1] images minus the per-pixel mean, some zero padding.
  aug = normalization.device_augment(config.data, inp.builder, inp.splits.train, 0)
  images = np.asarray(aug.train(batch['image'], 0, np.arange(8)))
  assert images.dtype == np.float32 and -1.0 <= images.min() < 0 < images.max() <= 1.0
  assert (images == 0).all(axis=-1).any()


@pytest.mark.parametrize('augment', ['scale', 'inception'])
def test_photos_train_and_eval_crops(photos_dir, augment):
  config = helpers.small_config(**{
      'data.name': 'sample_photos', 'data.data_dir': photos_dir, 'data.train_augment': augment,
      'data.image_size': 32, 'data.scale_range': (36, 48), 'data.eval_resize': 36,
      'data.normalize': 'imagenet_mean', 'batch_size': 8, 'eval_batch_size': 8})
  inp = _input(config)
  (batch,) = _batches(config, inp)
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert 0 <= batch['label'].min() and batch['label'].max() < inp.num_classes
  assert batch['image'].std() > 10  # photos, not blank canvases
  for crop, shape in (('center', (8, 32, 32, 3)), ('ten_crop', (8, 10, 32, 32, 3))):
    evals = list(eval_stream.eval_batches(config.data, inp, crop=crop))
    assert [e['image'].shape for e in evals] == [shape]
    assert int(evals[0]['mask'].sum()) == 8
  (scales,) = eval_stream.eval_batches(config.data, inp, crop='multi_scale')
  assert scales['scales']['224']['image'].shape == (8, 320, 320, 3)
  assert scales['scales']['224']['valid'].dtype == bool


def test_two_hosts_evaluate_every_example_exactly_once(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'eval_batch_size': 64})
  everything = [i for b in eval_stream.eval_batches(config.data, _input(config))
                for i in _ids(b['image'][b['mask']])]
  assert len(everything) == len(set(everything)) == 360
  per_host, steps = [], []
  for host in range(2):
    batches = list(eval_stream.eval_batches(config.data, _input(config, host, 2)))
    steps.append(len(batches))
    per_host.append([i for b in batches for i in _ids(b['image'][b['mask']])])
  assert steps[0] == steps[1] == 6  # 180 examples per host in batches of 32: 5 full, 1 padded
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == sorted(everything)


def test_global_batches_do_not_depend_on_hosts_devices_or_workers(digits_dir):
  """Host h reads rows host_rows of the same global batch: 1 host, 2 hosts, grain workers."""
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 32})
  whole = _batches(config, _input(config), start_step=40, num=6)
  parts = [_batches(config, _input(config, h, 2), start_step=40, num=6) for h in range(2)]
  for step, batch in enumerate(whole):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], np.concatenate([p[step][key] for p in parts]))
  config.data.workers = 2
  with_workers = _batches(config, _input(config), start_step=40, num=6)
  for a, b in zip(whole, with_workers):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_training_batches_are_deterministic_epochs_distinct_and_resume_at_any_step(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 64})
  inp = _input(config)
  run = _batches(config, inp, num=46)  # crosses two epoch boundaries (22 steps/epoch)
  again = _batches(config, inp, num=46)
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  for start in (5, 22, 27):
    resumed = _batches(config, inp, start_step=start, num=46 - start)
    for a, b in zip(run[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  # An epoch visits distinct examples; the next one is reshuffled.
  source = sources.open_source(inp.builder, inp.splits.train)
  epoch = [i for b in run[:22] for i in _ids(b['image'])]
  assert len(epoch) == 22 * 64 and len(set(epoch)) > 0.97 * len(epoch)  # a few digits repeat
  assert len(source) == 1437
  assert not np.array_equal(run[0]['label'], run[inp.steps_per_epoch]['label'])
  config.seed = 1
  assert not np.array_equal(_batches(config, inp)[0]['image'], run[0]['image'])


def test_resuming_reads_no_record_before_the_resumed_step(digits_dir):
  """Random access: a run resumed at step s reads only the records of the steps it trains."""
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 16})
  inp = _input(config)
  read = []
  real = sources.Source.read
  with mock.patch.object(sources.Source, 'read', lambda self, i: read.append(i) or real(self, i)):
    _batches(config, inp, start_step=50, num=2)
  assert len(read) == 2 * 16


def test_validation_holdout_splits_the_train_split(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.validation_size': 237})
  inp = _input(config)
  assert (inp.splits.train, inp.splits.eval) == ('train[237:]', 'train[:237]')
  assert (inp.splits.num_train, inp.splits.num_eval) == (1200, 237)


@pytest.mark.parametrize('field, value, says', [
    ('data.workers', 10_000, 'config.data.workers=10000: this host has'),
    ('data.threads', -2, 'config.data.threads=-2'),
    ('data.worker_buffer', 0, 'config.data.worker_buffer=0: give at least 1 batch'),
    ('data.read_buffer', 10**9, 'more than half of the'),
    ('batch_size', 0, 'batch_size=0 and eval_batch_size=40 must be positive'),
    ('data.train_augment', 'scal', "config.data.train_augment='scal'; choose one of"),
])
def test_workers_and_buffers_the_host_cannot_hold_are_config_errors(digits_dir, field, value,
                                                                     says):
  config = helpers.small_config(**{'data.data_dir': digits_dir, field: value})
  with pytest.raises(errors.ConfigError, match=re.escape(says)):
    inputs.create_input(config.data, batch_size=config.batch_size,
                        eval_batch_size=config.eval_batch_size, host_rows=(0, 16))


def test_a_truncated_jpeg_stops_the_run_with_its_key(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from resnet_jax.datasets import sample_photos  # pylint: disable=import-outside-toplevel
  sample_photos.prepare(str(tmp_path), num_train=12, num_test=4, long_side=64, truncated=(5,))
  config = helpers.small_config(**{
      'data.name': 'sample_photos', 'data.data_dir': str(tmp_path), 'data.image_size': 32,
      'data.train_augment': 'scale', 'data.scale_range': (36, 48),
      'data.normalize': 'imagenet_mean', 'batch_size': 4, 'eval_batch_size': 4})
  inp = _input(config)
  with pytest.raises(errors.DataError) as error:
    _batches(config, inp, num=3)  # the whole epoch
  found = re.search(r'The image of record (sample_photos-train\.array_record-00000-of-00001)'
                    r'__(\d+) of sample_photos \(train\) is corrupt or truncated', str(error.value))
  assert found, error.value
  # The record it names is the truncated one, and the only one.
  source = sources.open_source(inp.builder, 'train')
  bad = []
  for i in range(len(source)):
    try:
      Image.open(io.BytesIO(source.read(i)[0])).load()
    except OSError:
      bad.append(source.key(i))
  assert bad == [f'{found.group(1)}__{found.group(2)}']


def test_a_record_that_cannot_be_read_stops_the_run_with_its_key(tmp_path):
  """Bytes flipped inside one record's chunk of the ArrayRecord file: the batch that reads
  it stops with that record's key."""
  from resnet_jax.datasets import sample_photos  # pylint: disable=import-outside-toplevel
  sample_photos.prepare(str(tmp_path), num_train=12, num_test=4, long_side=64)
  config = helpers.small_config(**{
      'data.name': 'sample_photos', 'data.data_dir': str(tmp_path), 'data.image_size': 32,
      'data.normalize': 'imagenet_mean', 'batch_size': 4, 'eval_batch_size': 4})
  inp = _input(config)
  (path,) = (tmp_path / 'sample_photos').glob('*/sample_photos-train.array_record-*')
  data = bytearray(path.read_bytes())
  data[3000:3008] = b'\xff' * 8  # inside the third record's chunk, whose hash now fails
  path.write_bytes(bytes(data))
  source = sources.open_source(inp.builder, 'train')
  bad = []
  for i in range(len(source)):
    try:
      source.read(i)
    except errors.DataError:
      bad.append(source.key(i))
  assert len(bad) == 1, bad
  with pytest.raises(errors.DataError, match=re.escape(
      f'Record {bad[0]} of sample_photos (train) cannot be read: Corrupted Riegeli')):
    _batches(config, inp, num=3)  # the whole epoch
