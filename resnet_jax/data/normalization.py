"""Normalisation statistics, and the device-side augmentation built from config.data.

The per-pixel mean (the paper's CIFAR and ImageNet recipes) is computed once
from the training split and cached beside the data (any path epath reaches,
gs:// too), written whole and then renamed so that hosts computing it at once
never read half a file.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import uuid
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from resnet_jax import errors
from resnet_jax.data import device_augment as device_augment_lib
from resnet_jax.data import image_ops
from resnet_jax.data import sources

NORMALIZATIONS = ('per_pixel_mean', 'imagenet_mean', 'imagenet_mean_std')
# The per-pixel mean comes from at most this many training images: tfds stores a split's
# examples in a hashed (random) order, so the first 50,000 are a random sample whose
# mean is the whole split's within about 0.3 of a grey level, while decoding all of
# ImageNet's 1.28M at start-up would take long.
MEAN_EXAMPLES = 50_000


def _stats_path(builder: tfds.core.DatasetBuilder, split: str, size: int, first: int) -> epath.Path:
  sample = f'|first{first}' if first else ''
  key = hashlib.sha1(f'{split}|{size}|uint8{sample}'.encode()).hexdigest()[:12]
  return epath.Path(builder.data_dir) / f'resnet_jax_pixel_mean_{key}.npy'


def per_pixel_mean(builder: tfds.core.DatasetBuilder, split: str, size: int) -> np.ndarray:
  """Mean image of `split` (at most MEAN_EXAMPLES of it) at size x size in [0, 1] (of the
  uint8 images the pipeline sends), computed once and cached beside the data."""
  source = sources.open_source(builder, split)
  first = MEAN_EXAMPLES if len(source) > MEAN_EXAMPLES else 0
  path = _stats_path(builder, split, size, first)
  if path.exists():
    return np.load(io.BytesIO(path.read_bytes()))
  count = first or len(source)
  logging.info('Computing the per-pixel mean of %d images of %s %s at %dx%d (once; cached at '
               '%s).', count, builder.name, split, size, size, path)
  resize = lambda i: source.transformed(i, lambda image: image_ops.resize(image, size))[0]
  total = np.zeros((size, size, 3), np.float64)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow frees the GIL
    for start in range(0, count, 1024):
      total += np.sum(list(pool.map(resize, range(start, min(start + 1024, count)))), 0,
                      dtype=np.float64)
  mean = (total / max(count, 1) / 255.0).astype(np.float32)
  temporary = path.with_name(f'{path.name}.tmp-{uuid.uuid4().hex}')
  try:
    buffer = io.BytesIO()
    np.save(buffer, mean)
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(path)
  except OSError as e:  # a read-only data_dir: recompute next time
    logging.warning('Could not cache the pixel mean at %s: %s', path, e)
  return mean


def check_normalize(data_config: Any) -> None:
  if data_config.normalize not in NORMALIZATIONS:
    raise errors.ConfigError(f'config.data.normalize={data_config.normalize!r}; choose one of '
                             f'{", ".join(NORMALIZATIONS)}.')


def device_augment(data_config: Any, builder: tfds.core.DatasetBuilder, train_split: str,
                   seed: int) -> device_augment_lib.DeviceAugment:
  """What the jitted steps do to the pipeline's uint8 images (normalisation, and the cheap
  random augmentation of `data_config.train_augment`), drawing from `seed`."""
  kind = data_config.normalize
  if kind == 'per_pixel_mean':
    mean, std = per_pixel_mean(builder, train_split, data_config.image_size), None
  elif kind == 'imagenet_mean':
    mean, std = np.asarray(image_ops.IMAGENET_MEAN, np.float32), None
  elif kind == 'imagenet_mean_std':
    mean = np.asarray(image_ops.IMAGENET_MEAN, np.float32)
    std = np.asarray(image_ops.IMAGENET_STD, np.float32)
  else:
    raise errors.ConfigError(f'config.data.normalize={kind!r}; choose one of '
                             f'{", ".join(NORMALIZATIONS)}.')
  aug = data_config.train_augment
  return device_augment_lib.DeviceAugment(
      mean=mean, std=std,
      crop_padding=data_config.crop_padding if aug in ('pad_crop_flip', 'pad_crop') else 0,
      flip=aug in ('pad_crop_flip', 'scale', 'inception'),
      pca_lighting=data_config.pca_lighting if aug == 'scale' else 0.0,
      seed=seed)
