"""tfds builders: which data set, prepared where and how, its splits and sizes.

Data sets are prepared as ArrayRecord files, which tfds data sources read
with random access and without TensorFlow (`sources.py`). Preparing may need
TensorFlow (tfds' image encoder for data sets whose images it re-encodes, such
as imagenet2012): the `prepare` extra brings it. A data set found prepared as
TFRecord gets a message with the command that converts it (`convert.py`).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import socket
import urllib.parse
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from resnet_jax import datasets
from resnet_jax import errors

FILE_FORMAT = 'array_record'


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
  """The tfds builder for `data_config.name`, prepared (as ArrayRecord) if that needs no
  user files."""
  if data_config.name in datasets.BUILDERS:
    importlib.import_module(datasets.BUILDERS[data_config.name])  # registers it with tfds
  try:
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir,
                           file_format=FILE_FORMAT)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise errors.ConfigError(f'Unknown data set {data_config.name!r} (config.data.name): {e}') from None
  except ValueError as e:  # prepared in another format (tfds has no error type for it)
    if 'File format is already set' not in str(e):
      raise
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
  if builder.is_prepared():
    if prepare:
      check_format(builder)
  elif prepare:
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      raise DatasetNotPreparedError(not_prepared_message(builder, data_config))
    logging.info('Preparing %s in %s', builder.name, builder.data_dir)
    _download_and_prepare(builder, data_config)
  return builder


def check_format(builder: tfds.core.DatasetBuilder) -> None:
  """A data set prepared in another file format (TFRecord, tfds' default) cannot be read
  without TensorFlow: say how to convert it."""
  found = builder.info.file_format
  if found is not None and found.value != FILE_FORMAT:
    raise errors.DataError(
        f'{builder.data_dir} holds {builder.name} as {found.value} files; resnet_jax reads '
        f'{FILE_FORMAT} (random access, no TensorFlow). Convert it once, in place (the '
        f'{found.value} files stay): python run.py --mode=convert '
        f'--config.data.name={builder.name} --config.data.data_dir={builder.data_dir_root}')


def _download_and_prepare(builder: tfds.core.DatasetBuilder, data_config: Any) -> None:
  """tfds' download_and_prepare; no network (a compute node) gives one clear message."""
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_config.manual_dir))
  except ModuleNotFoundError as e:
    if e.name != 'tensorflow':
      raise
    raise errors.DataError(
        f'Preparing {builder.name} needs TensorFlow (tfds encodes its images with it): '
        "pip install -e '.[prepare]', or prepare it on another machine and pass its "
        'data_dir. Training and evaluation need no TensorFlow.') from None
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


def _manual_dir(builder: tfds.core.DatasetBuilder, data_config: Any) -> str:
  return data_config.manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')


def offline_message(builder: tfds.core.DatasetBuilder, data_config: Any, url: str) -> str:
  host = urllib.parse.urlparse(url).hostname or 'its download server'
  archive = os.path.basename(urllib.parse.urlparse(url).path) if url else 'its files'
  return (
      f'Cannot download the tfds data set {builder.name!r}: {host} cannot be reached from this '
      'machine (no network?). Two ways out:\n'
      f'  1. Prepare it on a machine with internet (python run.py --mode=prepare --config=<your '
      f'config> --config.data.data_dir=DIR), copy DIR here (or to a bucket) and pass '
      f'--config.data.data_dir=<the copy>.\n'
      f'  2. Download {url or archive} yourself and put {archive} in '
      f'{_manual_dir(builder, data_config)} (or pass --config.data.manual_dir=<its folder>); '
      f'tfds checks its size and checksum and prepares the data set from it in '
      f'{builder.data_dir_root}.')


def not_prepared_message(builder: tfds.core.DatasetBuilder, data_config: Any) -> str:
  manual_dir = _manual_dir(builder, data_config)
  files = ('ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'
           if builder.name == 'imagenet2012' else 'the files named below')
  return (
      f'The tfds data set {builder.name!r} is not prepared in {builder.data_dir_root}.\n'
      f'Put {files} (downloaded from the data set\'s site) in {manual_dir}, then prepare it once '
      "(hours for ImageNet; needs pip install -e '.[prepare]'):\n"
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
  return builder.info.splits[split].num_examples


def get_splits(builder: tfds.core.DatasetBuilder, data_config: Any) -> Splits:
  """Train/eval splits, with the optional validation hold-out, checked against the data set."""
  known = [str(s) for s in builder.info.splits.keys()]
  for field in ('train_split', 'eval_split'):
    base = data_config[field].split('[')[0]
    if base not in known:
      raise errors.ConfigError(f'config.data.{field}={data_config[field]!r}: {builder.name} has '
                               f'no split {base!r}. Available splits: {", ".join(sorted(known))}.')
  train, evaluation = data_config.train_split, data_config.eval_split
  if data_config.validation_size:
    if '[' in train:
      raise errors.ConfigError('config.data.validation_size needs an unsliced train_split, got '
                               f'{train!r}.')
    size = data_config.validation_size
    train, evaluation = f'{train}[{size}:]', f'{train}[:{size}]'
  return Splits(train, evaluation, num_examples(builder, train), num_examples(builder, evaluation))
