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
import itertools
import math
import os
import re
import socket
import urllib.parse
import uuid
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax import augment
from resnet_jax import errors
from resnet_jax import preprocessing as pp
from resnet_jax import datasets

# tf.data only: TensorFlow must never claim the accelerators JAX uses.
tf.config.set_visible_devices([], 'GPU')

TRAIN_AUGMENTS = ('pad_crop_flip', 'pad_crop', 'scale', 'inception', 'none')
EVAL_CROPS = ('center', 'ten_crop', 'multi_scale')
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


# --- Normalisation (applied on the devices: resnet_jax/augment.py) -----------

# The per-pixel mean comes from at most this many training images: tfds stores a split's
# examples in a hashed (random) order, so the first 50,000 are a random sample, and
# their mean is the whole split's within about 0.3 of a grey level (pixel std ~0.3 /
# sqrt(50,000)), while decoding all of ImageNet's 1.28M at start-up would take long.
MEAN_EXAMPLES = 50_000


def _stats_path(builder: tfds.core.DatasetBuilder, split: str, size: int, first: int) -> str:
  sample = f'|first{first}' if first else ''
  key = hashlib.sha1(f'{split}|{size}|uint8{sample}'.encode()).hexdigest()[:12]
  return os.path.join(builder.data_dir, f'resnet_jax_pixel_mean_{key}.npy')


def per_pixel_mean(builder: tfds.core.DatasetBuilder, split: str, size: int) -> np.ndarray:
  """Mean image of `split` (at most MEAN_EXAMPLES of it) at size x size in [0, 1] (of the
  uint8 images the pipeline sends), computed once and cached beside the data."""
  try:
    num_examples = builder.info.splits[split].num_examples
  except KeyError:  # no split metadata (tfds mock data): read it all
    num_examples = 0
  first = MEAN_EXAMPLES if num_examples > MEAN_EXAMPLES else 0
  path = _stats_path(builder, split, size, first)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, 'rb') as f:
      return np.load(f)
  logging.info('Computing the per-pixel mean of %s images of %s %s at %dx%d (once; cached '
               'at %s).', first or num_examples or 'all', builder.name, split, size, size, path)
  image_key, _ = image_and_label_keys(builder)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.take(first) if first else ds
  ds = ds.map(lambda ex: pp.resize(pp.decode(ex[image_key]), size),
              num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
  total, count = np.zeros((size, size, 3), np.float64), 0
  for images in tfds.as_numpy(ds):
    total += images.sum(0, dtype=np.float64)
    count += len(images)
  mean = (total / max(count, 1) / 255.0).astype(np.float32)
  # Written whole, then renamed: hosts computing it at once never read half a file.
  temporary = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with tf.io.gfile.GFile(temporary, 'wb') as f:
      np.save(f, mean)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  except (OSError, tf.errors.OpError) as e:  # a read-only data_dir: recompute next time
    logging.warning('Could not cache the pixel mean at %s: %s', path, e)
  return mean


def device_augment(builder: tfds.core.DatasetBuilder, config: Any,
                   train_split: str) -> augment.DeviceAugment:
  """What the jitted steps do to this pipeline's uint8 images (normalisation, and the cheap
  random augmentation of `config.data.train_augment`)."""
  data = config.data
  kind = data.normalize
  if kind == 'per_pixel_mean':
    mean, std = per_pixel_mean(builder, train_split, data.image_size), None
  elif kind == 'imagenet_mean':
    mean, std = np.asarray(pp.IMAGENET_MEAN, np.float32), None
  elif kind == 'imagenet_mean_std':
    mean, std = np.asarray(pp.IMAGENET_MEAN, np.float32), np.asarray(pp.IMAGENET_STD, np.float32)
  else:
    raise errors.ConfigError(f'config.data.normalize={kind!r}; choose one of '
                             f'{", ".join(NORMALIZATIONS)}.')
  aug = data.train_augment
  return augment.DeviceAugment(
      mean=mean, std=std,
      crop_padding=data.crop_padding if aug in ('pad_crop_flip', 'pad_crop') else 0,
      flip=aug in ('pad_crop_flip', 'scale', 'inception'),
      pca_lighting=data.pca_lighting if aug == 'scale' else 0.0,
      seed=_seed(config.seed, 'augment') % 2**31)


# --- Per-example preprocessing on the host: uint8 images out -------------------

def train_preprocess(data_config: Any, image_key: str, label_key: str):
  """(example, seed) -> {'image': uint8, 'label'}: the decoding, cropping and resizing part
  of the configured augmentation (the rest runs on the devices)."""
  size = data_config.image_size
  augment_kind = data_config.train_augment
  if augment_kind not in TRAIN_AUGMENTS:
    raise errors.ConfigError(f'config.data.train_augment={augment_kind!r}; choose one of '
                             f'{", ".join(TRAIN_AUGMENTS)}.')
  low, high = data_config.scale_range
  if augment_kind == 'scale' and not size <= low <= high:
    raise errors.ConfigError(f'config.data.scale_range={tuple(data_config.scale_range)} must '
                             f'satisfy image_size ({size}) <= low <= high.')

  def fn(example, seed):
    image = example[image_key]
    if augment_kind == 'inception':
      image = pp.inception_crop(image, size, seed)
    elif augment_kind == 'scale':
      image = pp.scale_augment(image, size, low, high, seed)
    else:  # CIFAR-style: the devices pad, crop and flip
      image = pp.resize(pp.decode(image), size)
    return {'image': tf.ensure_shape(image, (size, size, 3)),
            'label': tf.cast(example[label_key], tf.int32)}

  return fn


def check_eval_crop(data_config: Any, field: str = 'eval_crop') -> None:
  """Errors for an eval crop (config.data.`field`) that cannot run with this config."""
  crop = data_config[field]
  if crop not in EVAL_CROPS:
    raise errors.ConfigError(f'config.data.{field}={crop!r}; choose one of {", ".join(EVAL_CROPS)}.')
  if crop == 'ten_crop' and data_config.eval_resize <= data_config.image_size:
    raise errors.ConfigError(f'config.data.{field}=ten_crop needs config.data.eval_resize > '
                             'image_size (the paper: 256 for 224 crops), got '
                             f'{data_config.eval_resize}.')
  if crop == 'multi_scale':
    sides = tuple(int(s) for s in data_config.multi_scale_sides)
    if not sides or min(sides) < 1:
      raise errors.ConfigError(f'config.data.multi_scale_sides={data_config.multi_scale_sides}: '
                               'give the shorter sides to test at, e.g. (224, 256, 384, 480, 640).')


def eval_preprocess(data_config: Any, image_key: str, label_key: str):
  """example -> {'image': uint8, 'label', 'mask'}: centre crop (or whole image) or 10 crops."""
  size, resize_to, crop = data_config.image_size, data_config.eval_resize, data_config.eval_crop
  check_eval_crop(data_config)

  if crop == 'multi_scale':
    sides = tuple(int(s) for s in data_config.multi_scale_sides)

    def multi_scale(example):
      scales = {}
      for side in sides:
        image, valid = pp.on_canvas(example[image_key], side)
        scales[str(side)] = {'image': image, 'valid': valid}
      return {'scales': scales, 'label': tf.cast(example[label_key], tf.int32),
              'mask': tf.constant(True)}
    return multi_scale

  def fn(example):
    image = example[image_key]
    if resize_to and crop == 'center':
      image = pp.center_crop_of_resized(image, size, resize_to)
    elif resize_to:
      image = pp.to_uint8(pp.ten_crop(pp.resize_shorter_side(pp.decode(image), resize_to), size))
    else:
      image = pp.resize(pp.decode(image), size)
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


def _epoch_seed(config: Any, shard: int, epoch: int) -> int:
  return _seed(config.seed, shard, epoch) % 2**31


def _blocks(builder: tfds.core.DatasetBuilder, split: Any, size: int) -> list[tuple[str, int, int]]:
  """A split's records as (file, skip, take) blocks of at most `size` records."""
  blocks = []
  for f in builder.info.splits[split].file_instructions:
    for start in range(0, f.take, size):
      blocks.append((f.filename, f.skip + start, min(size, f.take - start)))
  return blocks


def _groups(config: Any, shard: int, blocks: list[tuple[str, int, int]], group_size: int,
            examples_per_epoch: int, start: int) -> Iterator[dict[str, Any]]:
  """One shard's epochs from example `start` (counted over all epochs) on, forever, as
  groups: shuffle-buffer loads of blocks, in an order drawn from (seed, shard, epoch).

  An example's place depends only on its group, so a resumed run skips whole
  groups unread and reads at most one group's worth of records to get back to
  where it was: no more than starting an epoch.
  """
  epoch, position = divmod(start, examples_per_epoch)
  while True:
    epoch_seed = _epoch_seed(config, shard, epoch)
    order = np.random.default_rng(epoch_seed).permutation(len(blocks))
    first, members = 0, []
    for i, block in enumerate([blocks[k] for k in order] + [None]):
      if block is not None and (not members or sum(b[2] for b in members) + block[2] <= group_size):
        members.append(block)
        if i < len(order) and first + sum(b[2] for b in members) < examples_per_epoch:
          continue
      if members:
        count = min(sum(b[2] for b in members), examples_per_epoch - first)
        if first + count > position:
          files, skips, takes = zip(*members)
          yield {'files': list(files), 'skips': list(skips), 'takes': list(takes),
                 'shuffle_seed': _seed(epoch_seed, first) % 2**31, 'epoch_seed': epoch_seed,
                 'first': first, 'skip': max(0, position - first), 'take': count}
        first += count
        members = [block] if block is not None else []
      if first >= examples_per_epoch:
        break
    epoch, position = epoch + 1, 0


def _dataset_options(data: Any) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if data.threads:
    options.threading.private_threadpool_size = data.threads
  if data.ram_budget_gb:
    options.autotune.ram_budget = int(data.ram_budget_gb * 2**30)
  return options


def check_resources(config: Any, builder: tfds.core.DatasetBuilder, split: str) -> None:
  """Clear errors for thread counts above the cores and RAM budgets below the shuffle buffers."""
  data = config.data
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  if data.threads < 0 or data.threads > cores:
    raise errors.ConfigError(f'config.data.threads={data.threads}: this host has {cores} cores '
                             f'for tf.data; use at most {cores} (0: as many as tf.data likes).')
  if data.ram_budget_gb:
    info = builder.info.splits[split.split('[')[0]]
    per_example = info.num_bytes / max(info.num_examples, 1)
    needed = 2 * data.shuffle_buffer * per_example / 2**30  # two groups in flight
    if data.ram_budget_gb < needed:
      raise errors.ConfigError(
          f'config.data.ram_budget_gb={data.ram_budget_gb} is below the {needed:.2f} GB that '
          f'two shuffle buffers of {data.shuffle_buffer} examples (config.data.shuffle_buffer) '
          'take: raise the budget or lower the buffer.')


def train_dataset(config: Any, inp: Input, start_step: int = 0) -> tf.data.Dataset:
  """This host's training batches (uint8 images) from global step `start_step` on, forever.

  One tf.data pipeline for all epochs (no restart, no drained parallelism at
  epoch boundaries). Batches are a function of (seed, step) only: the example
  order of each shard's epoch comes from (seed, shard, epoch), every
  example's augmentation from a stateless seed of its epoch and place.
  """
  data = config.data
  builder = inp.builder
  image_key, label_key = image_and_label_keys(builder)
  preprocess = train_preprocess(data, image_key, label_key)
  check_resources(config, builder, inp.splits.train)
  decoders = _decoders(builder, image_key)
  examples_per_epoch = inp.steps_per_epoch * inp.shard_batch_size
  group_size = max(1, data.shuffle_buffer // len(inp.shards))
  start = start_step * inp.shard_batch_size

  def augmented(epoch_seed, position, example):
    seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.cast(epoch_seed, tf.int64), tf.constant(0, tf.int64)]), position)
    return preprocess(example, seed)

  def shard_stream(shard: int) -> tf.data.Dataset:
    split = part_of_split(inp.splits.train, shard, inp.num_shards)
    if data.cache:  # the whole shard in memory, shuffled completely every epoch
      cached = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False).cache()
      first_epoch, skip = divmod(start, examples_per_epoch)

      def epochs():
        for e in itertools.count(first_epoch):
          yield _epoch_seed(config, shard, e), skip if e == first_epoch else 0

      def epoch(seed, skip):
        ds = cached.shuffle(examples_per_epoch + inp.shard_batch_size + 1, seed=seed,
                            reshuffle_each_iteration=False)
        ds = ds.take(examples_per_epoch).enumerate().skip(skip)
        return ds.map(lambda i, ex: (seed, i, ex))
      examples = tf.data.Dataset.from_generator(
          epochs, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64))
      ).flat_map(epoch)
    else:  # shuffle-buffer loads of blocks (see _groups)
      blocks = _blocks(builder, split, max(1, group_size))
      groups = tf.data.Dataset.from_generator(
          lambda: _groups(config, shard, blocks, group_size, examples_per_epoch, start),
          output_signature={
              'files': tf.TensorSpec([None], tf.string), 'skips': tf.TensorSpec([None], tf.int64),
              'takes': tf.TensorSpec([None], tf.int64), 'shuffle_seed': tf.TensorSpec([], tf.int64),
              'epoch_seed': tf.TensorSpec([], tf.int64), 'first': tf.TensorSpec([], tf.int64),
              'skip': tf.TensorSpec([], tf.int64), 'take': tf.TensorSpec([], tf.int64)})
      def read(group):
        records = tf.data.Dataset.from_tensor_slices(
            (group['files'], group['skips'], group['takes'])).interleave(
                lambda f, s, t: tf.data.TFRecordDataset(f).skip(s).take(t),
                cycle_length=tf.size(group['files'], tf.int64), block_length=1,
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        records = records.shuffle(tf.reduce_sum(group['takes']), seed=group['shuffle_seed'],
                                  reshuffle_each_iteration=False)
        records = records.take(group['take']).enumerate().skip(group['skip'])
        return records.map(lambda i, r: (group['epoch_seed'], group['first'] + i, r))
      # Two groups at a time: the next one's buffer fills while this one is served.
      examples = groups.interleave(read, cycle_length=2, block_length=group_size,
                                   num_parallel_calls=2, deterministic=True)
    parse = (lambda r: r) if data.cache else (
        lambda r: builder.info.features.deserialize_example(r, decoders=decoders))
    examples = examples.map(lambda seed, i, x: augmented(seed, i, parse(x)),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return examples.batch(inp.shard_batch_size, drop_remainder=True)

  def concat(*parts):
    return tf.nest.map_structure(lambda *x: tf.concat(x, axis=0), *parts)

  if len(inp.shards) == 1:
    ds = shard_stream(inp.shards[0])
  else:
    ds = tf.data.Dataset.zip(tuple(shard_stream(s) for s in inp.shards))
    ds = ds.map(concat, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_dataset_options(data))


def train_iterator(config: Any, inp: Input, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This host's training batches (numpy, uint8 images) from global step `start_step` on."""
  splits = [part_of_split(inp.splits.train, shard, inp.num_shards) for shard in inp.shards]
  return checked(tfds.as_numpy(train_dataset(config, inp, start_step)), inp.builder, splits)


def checked(batches: Iterator[Any], builder: tfds.core.DatasetBuilder,
            splits: Sequence[Any]) -> Iterator[Any]:
  """`batches`, but an image that cannot be decoded stops the run with its tfds key.

  tf.data's error does not say which record failed, so on such an error the
  records of `splits` are decoded one by one until the bad one is found (a
  pass over this host's part of the data: slow, but only then).
  """
  iterator = iter(batches)
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
      if not _DECODE_ERROR.search(str(e)):
        raise
      raise errors.DataError(bad_image_message(builder, splits, e)) from None
    yield batch


_DECODE_ERROR = re.compile(r'jpeg|JPEG|decode|Decode|image format|PNG|png')


def bad_image_message(builder: tfds.core.DatasetBuilder, splits: Sequence[Any],
                      error: Exception) -> str:
  image_key, _ = image_and_label_keys(builder)
  logging.warning('An image cannot be decoded; looking for it in %s.',
                  ', '.join(describe_split(s) for s in splits))
  for split in splits:
    ds = builder.as_dataset(split=split, decoders=_decoders(builder, image_key),
                            shuffle_files=False, read_config=tfds.ReadConfig(add_tfds_id=True))
    for example in ds:
      image = example[image_key]
      if image.dtype != tf.string:
        break
      try:
        tf.io.decode_image(image, channels=3, expand_animations=False)
      except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
        key = example['tfds_id'].numpy().decode()
        return (f'The image of record {key} of {builder.name} ({describe_split(split)}) is '
                'corrupt or truncated and cannot be decoded; nothing was trained on it. '
                f'Rebuild the data set from intact files, or remove that image and prepare '
                f'{builder.name} again. (tf.data: {_first_line(str(error))})')
  return (f'An image of {builder.name} cannot be decoded, but a second pass decoded all of '
          f'{", ".join(describe_split(s) for s in splits)}: {_first_line(str(error))}')


def _first_line(message: str) -> str:
  return (message.strip().splitlines() or [''])[0][:300]


def eval_dataset(config: Any, inp: Input, split: str | None = None) -> tf.data.Dataset:
  """This host's share of `split` (default: the eval split), in exactly `inp.eval_steps` batches.

  Examples past the end of the host's shard are padding with mask False, so
  each example of the split counts exactly once over all hosts. The dataset
  can be iterated once per evaluation (cached in memory if config.data.cache).
  """
  builder = inp.builder
  image_key, label_key = image_and_label_keys(builder)
  split = split or inp.splits.eval
  preprocess = eval_preprocess(config.data, image_key, label_key)
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
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_dataset_options(config.data))


def eval_batches(config: Any, inp: Input, dataset: tf.data.Dataset) -> Iterator[dict[str, Any]]:
  """The numpy batches of an `eval_dataset`; an undecodable image stops with its key."""
  split = part_of_split(inp.splits.eval, inp.process_index, inp.process_count)
  return checked(tfds.as_numpy(dataset), inp.builder, [split])
