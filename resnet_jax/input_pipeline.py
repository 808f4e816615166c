"""tfds -> tf.data -> per-host numpy batches.

The train split is cut into one shard per device; each host reads the shards
of its own devices and yields its part of the global batch. Training batches
are a deterministic function of (seed, step): epoch e of a shard shuffles with
a seed derived from (seed, shard, e) and every example's augmentation uses a
stateless seed derived from that and its position, so a run resumed at step s
sees exactly the batches an uninterrupted run sees from step s on.
Evaluation visits every example of a split exactly once (padded with masked
examples so that every host runs the same number of steps).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import re
import socket
import urllib.parse
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax import errors
from resnet_jax import preprocessing as pp
from resnet_jax import datasets

# tf.data only: TensorFlow must never claim the accelerators JAX uses.
tf.config.set_visible_devices([], 'GPU')

TRAIN_AUGMENTS = ('pad_crop_flip', 'pad_crop', 'scale', 'inception', 'none')
EVAL_CROPS = ('center', 'ten_crop')
NORMALIZATIONS = ('per_pixel_mean', 'imagenet_mean', 'imagenet_mean_std')


class DatasetNotPreparedError(errors.DataError):
  """The data set needs files the user must provide (e.g. the ILSVRC tars)."""


@dataclasses.dataclass(frozen=True)
class Splits:
  """The tfds split strings used for training and evaluation, and their sizes."""
  train: str
  eval: str
  num_train: int
  num_eval: int


def get_builder(data_config: Any, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The tfds builder for `data_config.name`, prepared if that needs no user files."""
  if data_config.name in datasets.BUILDERS:
    importlib.import_module(datasets.BUILDERS[data_config.name])  # registers it with tfds
  try:
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise errors.ConfigError(f'Unknown data set {data_config.name!r} (config.data.name): {e}') from None
  if prepare and not builder.is_prepared():
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      raise DatasetNotPreparedError(not_prepared_message(builder, data_config))
    logging.info('Preparing %s in %s', builder.name, builder.data_dir)
    _download_and_prepare(builder, data_config)
  return builder


def _download_and_prepare(builder: tfds.core.DatasetBuilder, data_config: Any) -> None:
  """tfds' download_and_prepare; no network (a compute node) gives one clear message."""
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_config.manual_dir))
  except Exception as e:  # pylint: disable=broad-except  (requests, urllib3, socket, tfds)
    url = _unreachable_url(e)
    if url is None:
      raise
    raise errors.DataError(offline_message(builder, data_config, url)) from None


_NETWORK_ERRORS = (ConnectionError, TimeoutError, socket.gaierror)
# requests' and urllib3's names for "could not connect" (not for an HTTP error status).
_NETWORK_ERROR_NAMES = ('ConnectionError', 'ConnectTimeout', 'ProxyError', 'MaxRetryError',
                        'NewConnectionError', 'NameResolutionError', 'ConnectTimeoutError')


def _unreachable_url(error: BaseException | None) -> str | None:
  """The URL of a download that failed for want of a network (None: another failure)."""
  network, url = False, None
  while error is not None:
    network = network or isinstance(error, _NETWORK_ERRORS) or (
        type(error).__module__.split('.')[0] in ('requests', 'urllib3')
        and type(error).__name__ in _NETWORK_ERROR_NAMES)
    request = getattr(error, 'request', None)
    url = url or getattr(request, 'url', None)
    if url is None and (found := re.search(r'https?://[^\s\'"]+', str(error))):
      url = found.group(0)
    error = error.__cause__ or error.__context__
  return (url or '') if network else None


def offline_message(builder: tfds.core.DatasetBuilder, data_config: Any, url: str) -> str:
  host = urllib.parse.urlparse(url).hostname or 'its download server'
  manual_dir = data_config.manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')
  archive = os.path.basename(urllib.parse.urlparse(url).path) if url else 'its files'
  return (
      f'Cannot download the tfds data set {builder.name!r}: {host} cannot be reached from this '
      'machine (no network?). Two ways out:\n'
      f'  1. Prepare it on a machine with internet (python run.py --mode=prepare --config=<your '
      f'config> --config.data.data_dir=DIR), copy DIR here (or to a bucket) and pass '
      f'--config.data.data_dir=<the copy>.\n'
      f'  2. Download {url or archive} yourself and put {archive} in {manual_dir} (or pass '
      '--config.data.manual_dir=<its folder>); tfds checks its size and checksum and prepares '
      f'the data set from it in {builder.data_dir_root}.')


def not_prepared_message(builder: tfds.core.DatasetBuilder, data_config: Any) -> str:
  manual_dir = data_config.manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')
  files = ('ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'
           if builder.name == 'imagenet2012' else 'the files named below')
  return (
      f'The tfds data set {builder.name!r} is not prepared in {builder.data_dir_root}.\n'
      f'Put {files} (downloaded from the data set\'s site) in {manual_dir}, then prepare it once '
      '(hours for ImageNet):\n'
      f'  python run.py --mode=prepare --config=<your config> '
      f'--config.data.data_dir={builder.data_dir_root} --config.data.manual_dir={manual_dir}\n'
      f'The builder says: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}')


def prepare(data_config: Any) -> tfds.core.DatasetBuilder:
  """Builds the tfds data set from the user's files in `manual_dir` (run.py --mode=prepare)."""
  builder = get_builder(data_config, prepare=False)
  if not builder.is_prepared():
    manual_dir = data_config.manual_dir
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and manual_dir and not os.path.isdir(manual_dir):
      raise DatasetNotPreparedError(f'manual_dir {manual_dir} does not exist.\n' +
                                    not_prepared_message(builder, data_config))
    _download_and_prepare(builder, data_config)
  return builder


def image_and_label_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  return tuple(keys) if keys else ('image', 'label')


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  return builder.info.features[image_and_label_keys(builder)[1]].num_classes


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in a split (slices such as 'train[5000:]' allowed)."""
  count = int(builder.as_dataset(split=split).cardinality())
  if count < 0:  # unknown: count once
    count = int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))
  return count


def get_splits(builder: tfds.core.DatasetBuilder, data_config: Any) -> Splits:
  """Train/eval splits, with the optional validation hold-out, checked against the data set."""
  known = [str(s) for s in builder.info.splits.keys()] if builder.info.splits else []
  for field in ('train_split', 'eval_split'):
    base = data_config[field].split('[')[0]
    if known and base not in known:
      raise errors.ConfigError(f'config.data.{field}={data_config[field]!r}: {builder.name} has no split '
                       f'{base!r}. Available splits: {", ".join(sorted(known))}.')
  train, evaluation = data_config.train_split, data_config.eval_split
  if data_config.validation_size:
    if '[' in train:
      raise errors.ConfigError('config.data.validation_size needs an unsliced train_split, got '
                       f'{train!r}.')
    size = data_config.validation_size
    train, evaluation = f'{train}[{size}:]', f'{train}[:{size}]'
  return Splits(train, evaluation, num_examples(builder, train), num_examples(builder, evaluation))


def describe_split(split: Any) -> str:
  """'test', or 'test (part 1 of 2)' for a host's or a shard's even part of a split."""
  if isinstance(split, str):
    return split
  return f'{split.split} (part {split.index + 1} of {split.count})'  # tfds.even_splits


def part_of_split(split: str, index: int, count: int) -> Any:
  """Part `index` of `split` cut into `count` disjoint parts (sizes differ by at most one)."""
  if count == 1:
    return split
  return tfds.even_splits(split, n=count, drop_remainder=False)[index]


# --- Normalisation -----------------------------------------------------------

def _stats_path(builder: tfds.core.DatasetBuilder, split: str, size: int) -> str:
  key = hashlib.sha1(f'{split}|{size}'.encode()).hexdigest()[:12]
  return os.path.join(builder.data_dir, f'resnet_jax_pixel_mean_{key}.npy')


def per_pixel_mean(builder: tfds.core.DatasetBuilder, split: str, size: int) -> np.ndarray:
  """Mean image of `split` at size x size in [0, 1], computed once and cached beside the data."""
  path = _stats_path(builder, split, size)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, 'rb') as f:
      return np.load(f)
  image_key, _ = image_and_label_keys(builder)
  ds = builder.as_dataset(split=split).map(
      lambda ex: pp.resize(pp.to_float(pp.decode(ex[image_key])), size),
      num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
  total, count = np.zeros((size, size, 3), np.float64), 0
  for images in tfds.as_numpy(ds):
    total += images.sum(0, dtype=np.float64)
    count += len(images)
  mean = (total / max(count, 1)).astype(np.float32)
  try:
    with tf.io.gfile.GFile(path, 'wb') as f:
      np.save(f, mean)
  except (OSError, tf.errors.OpError) as e:  # a read-only data_dir: recompute next time
    logging.warning('Could not cache the pixel mean at %s: %s', path, e)
  return mean


def normalizer(builder: tfds.core.DatasetBuilder, data_config: Any, train_split: str):
  """The mean subtraction (and scaling) applied to every [0, 1] image."""
  kind = data_config.normalize
  if kind == 'per_pixel_mean':
    mean = tf.constant(per_pixel_mean(builder, train_split, data_config.image_size))
    return lambda image: image - mean
  if kind == 'imagenet_mean':
    return lambda image: image - tf.constant(pp.IMAGENET_MEAN)
  if kind == 'imagenet_mean_std':
    return lambda image: (image - tf.constant(pp.IMAGENET_MEAN)) / tf.constant(pp.IMAGENET_STD)
  raise errors.ConfigError(f'config.data.normalize={kind!r}; choose one of {", ".join(NORMALIZATIONS)}.')


# --- Per-example preprocessing ------------------------------------------------

def train_preprocess(data_config: Any, normalize, image_key: str, label_key: str):
  """(example, seed) -> {'image', 'label'} with the configured augmentation."""
  size = data_config.image_size
  augment = data_config.train_augment

  def fn(example, seed):
    crop_seed, flip_seed, colour_seed = pp.split_seed(seed, 3)
    image = example[image_key]
    if augment == 'inception':
      image = pp.to_float(pp.inception_crop(image, size, crop_seed))
      image = normalize(pp.random_flip(image, flip_seed))
    elif augment == 'scale':
      low, high = data_config.scale_range
      image = pp.random_scale_and_crop(pp.to_float(pp.decode(image)), size, low, high, crop_seed)
      image = pp.random_flip(image, flip_seed)
      if data_config.pca_lighting:
        image = pp.pca_lighting(image, colour_seed, data_config.pca_lighting)
      image = normalize(image)
    else:
      # Mean first (it is per pixel), then zero padding, as in the paper.
      image = normalize(pp.resize(pp.to_float(pp.decode(image)), size))
      if augment in ('pad_crop_flip', 'pad_crop'):
        image = pp.pad_and_random_crop(image, data_config.crop_padding, crop_seed)
      if augment == 'pad_crop_flip':
        image = pp.random_flip(image, flip_seed)
    return {'image': tf.ensure_shape(image, (size, size, 3)),
            'label': tf.cast(example[label_key], tf.int32)}

  if augment not in TRAIN_AUGMENTS:
    raise errors.ConfigError(f'config.data.train_augment={augment!r}; choose one of '
                     f'{", ".join(TRAIN_AUGMENTS)}.')
  return fn


def eval_preprocess(data_config: Any, normalize, image_key: str, label_key: str):
  """example -> {'image', 'label', 'mask'}: centre crop (or whole image) or 10 crops."""
  size, resize_to, crop = data_config.image_size, data_config.eval_resize, data_config.eval_crop
  if crop not in EVAL_CROPS:
    raise errors.ConfigError(f'config.data.eval_crop={crop!r}; choose one of {", ".join(EVAL_CROPS)}.')
  if crop == 'ten_crop' and resize_to <= size:
    raise errors.ConfigError('config.data.eval_crop=ten_crop needs config.data.eval_resize > image_size '
                     f'(the paper: 256 for 224 crops), got {resize_to}.')

  def fn(example):
    image = pp.to_float(pp.decode(example[image_key]))
    if resize_to:
      image = pp.resize_shorter_side(image, resize_to)
      image = pp.ten_crop(image, size) if crop == 'ten_crop' else pp.center_crop(image, size)
    else:
      image = pp.resize(image, size)
    image = normalize(image)
    shape = (10, size, size, 3) if crop == 'ten_crop' else (size, size, 3)
    return {'image': tf.ensure_shape(image, shape),
            'label': tf.cast(example[label_key], tf.int32),
            'mask': tf.constant(True)}

  return fn


def _decoders(builder: tfds.core.DatasetBuilder, image_key: str) -> dict[str, Any] | None:
  """Variable-size (JPEG) images stay encoded so that crops can decode only what they need."""
  shape = builder.info.features[image_key].shape
  return {image_key: tfds.decode.SkipDecoding()} if None in shape[:2] else None


# --- Iterators -----------------------------------------------------------------

@dataclasses.dataclass
class Input:
  """Everything the trainer needs to know about its data.

  Training data is split into `num_shards` disjoint shards, one per device of
  the whole run; the global batch is one slice of `shard_batch_size` examples
  from every shard, and a host reads only the shards of its own devices
  (`shards`). So the global batches depend on the seed and the number of
  devices, but not on how the devices are spread over hosts: 2 hosts x 4
  devices train exactly like 1 host x 8. Evaluation splits the eval split by
  host (`process_index` of `process_count`).
  """
  builder: tfds.core.DatasetBuilder
  splits: Splits
  num_classes: int
  shards: tuple[int, ...]
  num_shards: int
  shard_batch_size: int
  steps_per_epoch: int
  eval_steps: int
  local_eval_batch_size: int
  process_index: int
  process_count: int

  @property
  def local_batch_size(self) -> int:
    return self.shard_batch_size * len(self.shards)


def create_input(config: Any, shards: Sequence[int], num_shards: int, process_index: int = 0,
                 process_count: int = 1) -> Input:
  """Resolves the data set, splits and batch sizes; fails early on bad input.

  `shards`: the data shards this host reads, of `num_shards` (normally the
  indices of this host's devices among all devices).
  """
  if config.batch_size % num_shards or config.eval_batch_size % process_count:
    raise errors.ConfigError(f'batch_size={config.batch_size} must be divisible by {num_shards} and '
                     f'eval_batch_size={config.eval_batch_size} by the {process_count} hosts.')
  builder = get_builder(config.data)
  splits = get_splits(builder, config.data)
  shard_batch = config.batch_size // num_shards
  steps_per_epoch = (splits.num_train // num_shards) // shard_batch
  if steps_per_epoch < 1:
    raise errors.ConfigError(f'The train split {splits.train!r} has {splits.num_train} examples, fewer '
                     f'than one global batch of {config.batch_size}: lower config.batch_size.')
  local_eval_batch = config.eval_batch_size // process_count
  eval_steps = math.ceil(math.ceil(splits.num_eval / process_count) / local_eval_batch)
  return Input(builder, splits, num_classes(builder), tuple(shards), num_shards, shard_batch,
               steps_per_epoch, eval_steps, local_eval_batch, process_index, process_count)


def _seed(*parts: int) -> int:
  return int.from_bytes(hashlib.sha256('/'.join(map(str, parts)).encode()).digest()[:7], 'little')


def train_iterator(config: Any, inp: Input, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This host's training batches from global step `start_step` on, forever."""
  data = config.data
  builder = inp.builder
  image_key, label_key = image_and_label_keys(builder)
  normalize = normalizer(builder, data, inp.splits.train)
  preprocess = train_preprocess(data, normalize, image_key, label_key)
  decoders = _decoders(builder, image_key)
  splits = {shard: part_of_split(inp.splits.train, shard, inp.num_shards) for shard in inp.shards}
  examples_per_epoch = inp.steps_per_epoch * inp.shard_batch_size
  cached, shuffle_buffer = {}, max(1, data.shuffle_buffer // len(inp.shards))
  if data.cache:
    cached = {shard: builder.as_dataset(split=split, decoders=decoders).cache()
              for shard, split in splits.items()}
    # A full shuffle reads the whole shard in every epoch, so the cache completes.
    shuffle_buffer = max(shuffle_buffer, examples_per_epoch + inp.shard_batch_size)

  def shard_epoch(shard: int, epoch: int, skip: int) -> tf.data.Dataset:
    """One epoch of one shard: shuffled, augmented with per-example stateless seeds."""
    epoch_seed = _seed(config.seed, shard, epoch)
    if data.cache:
      ds = cached[shard]
    else:
      ds = builder.as_dataset(split=splits[shard], decoders=decoders, shuffle_files=True,
                              read_config=tfds.ReadConfig(shuffle_seed=epoch_seed % 2**31))
    if shuffle_buffer > 1:
      ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(examples_per_epoch).enumerate().skip(skip * inp.shard_batch_size)
    seed = tf.constant([epoch_seed % 2**31, 0], tf.int64)
    ds = ds.map(lambda i, ex: preprocess(ex, tf.random.experimental.stateless_fold_in(seed, i)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(inp.shard_batch_size, drop_remainder=True)

  def concat(*parts):
    return tf.nest.map_structure(lambda *x: tf.concat(x, axis=0), *parts)

  epoch, skip = divmod(start_step, inp.steps_per_epoch)
  while True:
    ds = tf.data.Dataset.zip(tuple(shard_epoch(s, epoch, skip) for s in inp.shards))
    ds = ds.map(concat, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    yield from tfds.as_numpy(ds)
    epoch, skip = epoch + 1, 0


def eval_dataset(config: Any, inp: Input, split: str | None = None) -> tf.data.Dataset:
  """This host's share of `split` (default: the eval split), in exactly `inp.eval_steps` batches.

  Examples past the end of the host's shard are padding with mask False, so
  each example of the split counts exactly once over all hosts. The dataset
  can be iterated once per evaluation (cached in memory if config.data.cache).
  """
  builder = inp.builder
  image_key, label_key = image_and_label_keys(builder)
  split = split or inp.splits.eval
  normalize = normalizer(builder, config.data, inp.splits.train)
  preprocess = eval_preprocess(config.data, normalize, image_key, label_key)
  ds = builder.as_dataset(split=part_of_split(split, inp.process_index, inp.process_count),
                          decoders=_decoders(builder, image_key), shuffle_files=False)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  total = inp.eval_steps * inp.local_eval_batch_size
  padding = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)).repeat()
  ds = ds.concatenate(padding).take(total)
  ds = ds.batch(inp.local_eval_batch_size, drop_remainder=True)
  if config.data.cache:
    ds = ds.cache()
  return ds.prefetch(tf.data.AUTOTUNE)
