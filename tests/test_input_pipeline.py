"""Input pipelines: shapes and ranges, the paper's crops, host shards, determinism, resume."""
import hashlib
import itertools
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax import input_pipeline
from resnet_jax import preprocessing as pp
from tests import helpers


@pytest.fixture
def mock_tfds():
  """tfds mock data: random examples, no files; data sets count as prepared."""
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
    yield


def _input(config, host=0, hosts=1, shards_per_host=1):
  """The Input of simulated host `host` of `hosts`, each with `shards_per_host` devices."""
  shards = range(host * shards_per_host, (host + 1) * shards_per_host)
  return input_pipeline.create_input(config, shards, hosts * shards_per_host, host, hosts)


def _first_batches(config, host=0, hosts=1, shards_per_host=1, start_step=0, num=1):
  inp = _input(config, host, hosts, shards_per_host)
  return inp, list(itertools.islice(input_pipeline.train_iterator(config, inp, start_step), num))


def test_cifar10_shapes_dtypes_and_ranges_on_mock_data(mock_tfds):
  config = helpers.small_config(**{'data.name': 'cifar10', 'data.train_augment': 'pad_crop_flip',
                                   'batch_size': 8, 'eval_batch_size': 8})
  inp, (batch,) = _first_batches(config)
  assert inp.num_classes == 10
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  # [0, 1] images minus the per-pixel mean (padding is 0 = the mean).
  assert -1.0 <= batch['image'].min() < 0 < batch['image'].max() <= 1.0
  evals = list(tfds.as_numpy(input_pipeline.eval_dataset(config, inp)))
  assert [e['image'].shape for e in evals] == [(8, 32, 32, 3)] * 3
  assert sum(int(e['mask'].sum()) for e in evals) == 24


@pytest.mark.parametrize('augment', ['scale', 'inception'])
def test_imagenet_shapes_dtypes_and_ranges_on_mock_data(mock_tfds, augment):
  config = helpers.small_config(**{
      'data.name': 'imagenet2012', 'data.train_augment': augment, 'data.image_size': 32,
      'data.scale_range': (36, 48), 'data.eval_resize': 36, 'data.normalize': 'imagenet_mean',
      'data.pca_lighting': 0.1, 'data.eval_split': 'validation', 'batch_size': 8,
      'eval_batch_size': 8})
  inp, (batch,) = _first_batches(config)
  assert inp.num_classes == 1000
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert -0.9 < batch['image'].min() and batch['image'].max() < 0.9
  assert 0 <= batch['label'].min() and batch['label'].max() < 1000
  config.data.eval_crop = 'ten_crop'
  evals = list(tfds.as_numpy(input_pipeline.eval_dataset(config, inp)))
  assert evals[0]['image'].shape == (8, 10, 32, 32, 3)


def test_grey_data_sets_become_rgb(mock_tfds):
  config = helpers.small_config(**{'data.name': 'mnist', 'batch_size': 8, 'eval_batch_size': 8})
  inp, (batch,) = _first_batches(config)
  assert batch['image'].shape == (8, 32, 32, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


def test_ten_crop_geometry():
  image = tf.reshape(tf.range(6 * 8, dtype=tf.float32), (6, 8, 1))
  crops = pp.ten_crop(image, 4).numpy()
  assert crops.shape == (10, 4, 4, 1)
  full = image.numpy()
  expected = [full[0:4, 0:4], full[0:4, 4:8], full[2:6, 0:4], full[2:6, 4:8], full[1:5, 2:6]]
  for i, crop in enumerate(expected):
    np.testing.assert_array_equal(crops[i], crop)
    np.testing.assert_array_equal(crops[i + 5], crop[:, ::-1])  # the mirrored views
  np.testing.assert_array_equal(pp.center_crop(image, 4).numpy(), expected[4])


def test_scale_augmentation_samples_every_shorter_side_in_range_and_no_other():
  """The paper's S ~ U[256, 480], both ends included (225 values)."""
  sides = pp.sample_shorter_sides(tf.constant([7, 1], tf.int64), 4000, 256, 480).numpy()
  assert sides.min() == 256 and sides.max() == 480
  counts = np.bincount(sides - 256, minlength=225)
  assert len(counts) == 225 and counts.min() > 0  # every value, nothing outside
  assert abs(sides.mean() - 368) < 4  # uniform: mean (256 + 480) / 2
  # A narrow range shows the ends as clearly.
  assert set(pp.sample_shorter_sides(tf.constant([1, 2], tf.int64), 200, 30, 32).numpy()) == {
      30, 31, 32}
  # The crop is taken from the image resized to that side.
  image = tf.random.uniform((300, 400, 3))
  seeds = [tf.constant([s, 1], tf.int64) for s in range(5)]
  crops = [pp.random_scale_and_crop(image, 224, 256, 480, seed) for seed in seeds]
  assert {tuple(c.shape) for c in crops} == {(224, 224, 3)}


def test_cifar_pad_and_crop_reaches_into_the_padding():
  seeds = [tf.constant([s, 1], tf.int64) for s in range(20)]
  small = tf.ones((32, 32, 3))
  padded = [pp.pad_and_random_crop(small, 4, seed).numpy() for seed in seeds]
  assert all(p.shape == (32, 32, 3) for p in padded)
  # Some crops reach into the zero padding, none is padding only.
  assert min(p.mean() for p in padded) < 1.0 and min(p.max() for p in padded) == 1.0


def test_pca_lighting_shifts_every_pixel_by_one_rgb_offset():
  image = tf.zeros((4, 4, 3))
  out = pp.pca_lighting(image, tf.constant([3, 4], tf.int64), 0.1).numpy()
  np.testing.assert_allclose(out, np.broadcast_to(out[0, 0], out.shape))
  assert 0 < np.abs(out[0, 0]).max() < 0.2


def _image_ids(batches):
  return [hashlib.sha1(image.tobytes()).hexdigest() for b in batches
          for image, keep in zip(b['image'], b['mask']) if keep]


def test_two_hosts_evaluate_every_example_exactly_once(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'eval_batch_size': 64})
  single = _input(config)
  everything = _image_ids(tfds.as_numpy(input_pipeline.eval_dataset(config, single)))
  assert len(everything) == len(set(everything)) == 360
  per_host, steps = [], []
  for host in range(2):
    inp = _input(config, host, 2)
    batches = list(tfds.as_numpy(input_pipeline.eval_dataset(config, inp)))
    steps.append(len(batches))
    per_host.append(_image_ids(batches))
  assert steps[0] == steps[1] == 6  # 180 examples per host in batches of 32: 5 full, 1 padded
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == sorted(everything)


def test_hosts_train_on_disjoint_shards(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 32,
                                   'data.train_augment': 'none'})
  seen = []
  for host in range(2):
    inp, batches = _first_batches(config, host, 2, shards_per_host=4, num=44)
    assert inp.steps_per_epoch == 44 and inp.local_batch_size == 16  # (1437 // 8) // 4 = 44
    seen.append({hashlib.sha1(x.tobytes()).hexdigest() for b in batches for x in b['image']})
  assert len(seen[0]) == len(seen[1]) == 44 * 16  # an epoch of distinct examples per host
  assert not seen[0] & seen[1]


def test_global_batches_do_not_depend_on_the_host_layout(digits_dir):
  """2 hosts x 4 devices see exactly the global batches of 1 host x 8 devices."""
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 32})
  _, single = _first_batches(config, shards_per_host=8, num=50, start_step=40)
  _, host0 = _first_batches(config, 0, 2, shards_per_host=4, num=50, start_step=40)
  _, host1 = _first_batches(config, 1, 2, shards_per_host=4, num=50, start_step=40)
  for whole, a, b in zip(single, host0, host1):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]))


def test_training_batches_are_deterministic_and_resume_at_any_step(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 64})
  inp, run = _first_batches(config, num=30)  # crosses two epoch boundaries (22 steps/epoch)
  _, again = _first_batches(config, num=30)
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  for start in (5, 22, 27):
    _, resumed = _first_batches(config, start_step=start, num=30 - start)
    for a, b in zip(run[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  # Epochs are reshuffled, and another seed gives other batches.
  assert not np.array_equal(run[0]['label'], run[inp.steps_per_epoch]['label'])
  config.seed = 1
  _, other = _first_batches(config)
  assert not np.array_equal(other[0]['image'], run[0]['image'])


def test_per_pixel_mean_is_computed_once_and_cached(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir})
  builder = input_pipeline.get_builder(config.data)
  mean = input_pipeline.per_pixel_mean(builder, 'train', 32)
  assert mean.shape == (32, 32, 3) and 0 < mean.mean() < 0.5
  with mock.patch.object(builder, 'as_dataset', side_effect=AssertionError('recomputed')):
    np.testing.assert_array_equal(input_pipeline.per_pixel_mean(builder, 'train', 32), mean)


def test_validation_holdout_splits_the_train_split(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.validation_size': 237})
  inp = _input(config)
  assert (inp.splits.train, inp.splits.eval) == ('train[237:]', 'train[:237]')
  assert (inp.splits.num_train, inp.splits.num_eval) == (1200, 237)


def test_tensorflow_sees_no_accelerators():
  assert tf.config.get_visible_devices('GPU') == []
