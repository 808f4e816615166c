"""Input pipelines: shapes and ranges, the paper's crops, host shards, determinism, resume."""
import hashlib
import itertools
import os
import re
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax import errors
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


def _on_device(config, inp, batch, step=0):
  """What the train step feeds the model: the devices' part of the augmentation."""
  aug = input_pipeline.device_augment(inp.builder, config, inp.splits.train)
  return np.asarray(aug.train(batch['image'], step, np.arange(len(batch['label']))))


def test_cifar10_shapes_dtypes_and_ranges_on_mock_data(mock_tfds):
  config = helpers.small_config(**{'data.name': 'cifar10', 'data.train_augment': 'pad_crop_flip',
                                   'batch_size': 8, 'eval_batch_size': 8})
  inp, (batch,) = _first_batches(config)
  assert inp.num_classes == 10
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  # On the devices: [0, 1] images minus the per-pixel mean, some zero padding.
  images = _on_device(config, inp, batch)
  assert images.dtype == np.float32 and images.shape == (8, 32, 32, 3)
  assert -1.0 <= images.min() < 0 < images.max() <= 1.0
  assert (images == 0).all(axis=-1).any()
  evals = list(tfds.as_numpy(input_pipeline.eval_dataset(config, inp)))
  assert [e['image'].shape for e in evals] == [(8, 32, 32, 3)] * 3
  assert {e['image'].dtype for e in evals} == {np.dtype(np.uint8)}
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
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  images = _on_device(config, inp, batch)
  assert -0.9 < images.min() and images.max() < 0.9
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
  # The crop's place in the image resized to S: uniform over every position.
  shape = tf.constant([300, 400, 3])
  tops, lefts, heights, widths = [], [], [], []
  for s in range(600):
    side, top, left = pp.sample_scale_crop(tf.constant([s, 5], tf.int64), shape, 224, 256, 260)
    height, width = pp.scaled_shape(shape, side).numpy()
    tops.append(int(top))
    lefts.append(int(left))
    heights.append(height)
    widths.append(width)
  assert all(0 <= t <= h - 224 for t, h in zip(tops, heights))
  assert all(0 <= l <= w - 224 for l, w in zip(lefts, widths))
  assert min(tops) == 0 and max(t - (h - 224) for t, h in zip(tops, heights)) == 0
  assert min(lefts) == 0 and max(l - (w - 224) for l, w in zip(lefts, widths)) == 0
  assert abs(np.mean([t / (h - 224) for t, h in zip(tops, heights)]) - 0.5) < 0.05


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


def test_thread_pool_and_ram_budget_reach_tf_data(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.threads': 1,
                                   'data.ram_budget_gb': 0.5})
  inp = _input(config)
  options = input_pipeline.train_dataset(config, inp).options()
  assert options.threading.private_threadpool_size == 1
  assert options.autotune.ram_budget == 2**29


@pytest.mark.parametrize('field, value, says', [
    ('data.threads', 10_000, 'config.data.threads=10000: this host has'),
    ('data.threads', -1, 'config.data.threads=-1'),
    ('data.ram_budget_gb', 1e-6, 'config.data.ram_budget_gb=1e-06 is below the'),
])
def test_thread_counts_above_the_cores_and_budgets_below_the_buffers_are_config_errors(
    digits_dir, field, value, says):
  config = helpers.small_config(**{'data.data_dir': digits_dir, field: value})
  with pytest.raises(errors.ConfigError, match=re.escape(says)):
    input_pipeline.train_dataset(config, _input(config))


def test_per_pixel_mean_of_a_big_split_comes_from_its_first_examples(digits_dir, monkeypatch):
  """Big splits (ImageNet) average a random sample: tfds stores examples in hashed order."""
  monkeypatch.setattr(input_pipeline, 'MEAN_EXAMPLES', 100)
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.validation_size': 37})
  builder = input_pipeline.get_builder(config.data)
  mean = input_pipeline.per_pixel_mean(builder, 'train[37:]', 32)
  first = builder.as_dataset(split='train[37:]', shuffle_files=False).take(100).map(
      lambda ex: pp.resize(pp.decode(ex['image']), 32)).batch(100)
  expected = next(iter(tfds.as_numpy(first))).astype(np.float64).mean(0) / 255
  np.testing.assert_allclose(mean, expected, atol=1e-6)
  monkeypatch.setattr(input_pipeline, 'MEAN_EXAMPLES', 10_000)  # the whole split: another file
  assert np.abs(input_pipeline.per_pixel_mean(builder, 'train[37:]', 32) - mean).max() > 1e-4
  assert not [f for f in os.listdir(builder.data_dir) if '.tmp-' in f]  # written, then renamed


def test_validation_holdout_splits_the_train_split(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.validation_size': 237})
  inp = _input(config)
  assert (inp.splits.train, inp.splits.eval) == ('train[237:]', 'train[:237]')
  assert (inp.splits.num_train, inp.splits.num_eval) == (1200, 237)


def test_tensorflow_sees_no_accelerators():
  assert tf.config.get_visible_devices('GPU') == []


def test_a_resumed_epoch_skips_whole_groups_unread():
  """Without the cache an epoch is read as shuffle-buffer loads of blocks; a run resumed
  mid-epoch starts at its group and reads no earlier one."""
  config = helpers.small_config()
  blocks = [(f'file{i}', 0, 100) for i in range(20)]  # 2,000 records
  groups = lambda start: list(itertools.islice(
      input_pipeline._groups(config, 0, blocks, 300, 1800, start), 14))  # pylint: disable=protected-access
  full = groups(0)
  epoch_of = lambda g: g['epoch_seed']
  first_epoch = [g for g in full if epoch_of(g) == epoch_of(full[0])]
  assert [g['first'] for g in first_epoch] == list(range(0, 1800, 300))
  assert all(sum(g['takes']) <= 300 and g['skip'] == 0 for g in full)
  assert sum(g['take'] for g in first_epoch) == 1800  # the epoch's 18 batches of 100
  used = [b for g in first_epoch for b in zip(g['files'], g['skips'], g['takes'])]
  assert len(set(used)) == len(used) == 18
  assert epoch_of(full[6]) != epoch_of(full[0])  # the next epoch draws another order
  assert [g['files'] for g in full[6:12]] != [g['files'] for g in first_epoch]
  resumed = groups(1000)  # mid-group: the group from 900 is read, 100 records dropped
  assert resumed[0]['first'] == 900 and resumed[0]['skip'] == 100
  assert [g['files'] for g in resumed[1:6]] == [g['files'] for g in full[4:9]]
  assert groups(1800 + 600)[0]['first'] == 600  # in the second epoch


@pytest.mark.parametrize('cache', [True, False])
def test_one_pipeline_runs_all_epochs_and_resumes_exactly_with_or_without_the_cache(
    digits_dir, cache):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 64,
                                   'data.cache': cache, 'data.shuffle_buffer': 400})
  inp = _input(config)
  real, built = input_pipeline.train_dataset, []
  with mock.patch.object(input_pipeline, 'train_dataset',
                         lambda *a: built.append(a) or real(*a)):
    run = list(itertools.islice(input_pipeline.train_iterator(config, inp), 46))  # 2+ epochs
  assert len(built) == 1  # one pipeline for all epochs: no restart at their boundaries
  for start in (7, 22, 30):
    resumed = list(itertools.islice(input_pipeline.train_iterator(config, inp, start), 46 - start))
    for a, b in zip(run[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  epoch = {hashlib.sha1(x.tobytes()).hexdigest() for b in run[:22] for x in b['image']}
  assert len(epoch) > 0.97 * 22 * 64  # an epoch of distinct examples (a few digits repeat)


@pytest.fixture(scope='module')
def broken_imagenet(tmp_path_factory):
  """The real imagenet2012 builder on sample tars with one truncated JPEG."""
  from resnet_jax.datasets import sample_imagenet  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('broken')
  synsets = sample_imagenet.write_manual_dir(str(root / 'manual'), train_per_class=3, num_val=4,
                                             long_side=120, truncated=('n01751748_1.JPEG',))
  assert 'n01751748' in synsets
  config = helpers.small_config(**{
      'data.name': 'imagenet2012', 'data.data_dir': str(root / 'tfds'),
      'data.manual_dir': str(root / 'manual'), 'data.eval_split': 'validation',
      'data.train_augment': 'scale', 'data.image_size': 32, 'data.scale_range': (36, 48),
      'data.eval_resize': 36, 'data.normalize': 'imagenet_mean', 'batch_size': 4,
      'eval_batch_size': 4, 'data.cache': False, 'data.shuffle_buffer': 8})
  input_pipeline.prepare(config.data)
  return config


def test_a_truncated_jpeg_stops_the_run_with_its_key(broken_imagenet):
  from resnet_jax import errors  # pylint: disable=import-outside-toplevel
  inp = _input(broken_imagenet)
  with pytest.raises(errors.DataError, match=r'The image of record imagenet2012-train\.tfrecord-'
                     r'\d+-of-\d+__\d+ of imagenet2012 \(train\) is corrupt or truncated'):
    list(itertools.islice(input_pipeline.train_iterator(broken_imagenet, inp), 10))


def test_the_train_pipeline_draws_the_configured_shorter_sides(monkeypatch):
  """The paper's recipe asks for S in [256, 480]: that is what the pipeline samples from."""
  from configs import imagenet  # pylint: disable=import-outside-toplevel
  config = imagenet.get_config('resnet50')
  asked = []
  real = pp.sample_shorter_sides
  monkeypatch.setattr(pp, 'sample_shorter_sides',
                      lambda seed, num, low, high: asked.append((low, high)) or real(
                          seed, num, low, high))
  preprocess = input_pipeline.train_preprocess(config.data, 'image', 'label')
  image = tf.io.encode_jpeg(tf.zeros((300, 400, 3), tf.uint8))
  out = preprocess({'image': image, 'label': 3}, tf.constant([1, 2], tf.int64))
  assert out['image'].shape == (224, 224, 3) and out['image'].dtype == tf.uint8
  assert set(asked) == {(256, 480)}
