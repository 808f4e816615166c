"""What the host does to one example: decode, crop and resize; uint8 out.

The rest of the augmentation (flips, PCA lighting, CIFAR pad-and-crop) and
normalisation run in the jitted steps (`device_augment.py`), so the host
sends uint8 batches. Each function here is built once from `config.data` and
checks its fields, so a bad value stops the run before anything is read.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from resnet_jax import errors
from resnet_jax.data import image_ops

TRAIN_AUGMENTS = ('pad_crop_flip', 'pad_crop', 'scale', 'inception', 'none')
EVAL_CROPS = ('center', 'ten_crop', 'multi_scale')


def check_train_augment(data_config: Any) -> None:
  size, kind = data_config.image_size, data_config.train_augment
  if kind not in TRAIN_AUGMENTS:
    raise errors.ConfigError(f'config.data.train_augment={kind!r}; choose one of '
                             f'{", ".join(TRAIN_AUGMENTS)}.')
  low, high = data_config.scale_range
  if kind == 'scale' and not size <= low <= high:
    raise errors.ConfigError(f'config.data.scale_range={tuple(data_config.scale_range)} must '
                             f'satisfy image_size ({size}) <= low <= high.')


def train_preprocess(data_config: Any) -> Callable[[Any, np.random.Generator], np.ndarray]:
  """(image, rng) -> uint8 image_size x image_size x 3: the host's part of the configured
  augmentation; `rng` draws its random geometry."""
  check_train_augment(data_config)
  size, kind = data_config.image_size, data_config.train_augment
  low, high = data_config.scale_range
  if kind == 'inception':
    return lambda image, rng: image_ops.inception_crop(image, size, rng)
  if kind == 'scale':
    return lambda image, rng: image_ops.scale_augment(image, size, low, high, rng)
  return lambda image, rng: image_ops.resize(image, size)  # CIFAR-style: the devices crop


def check_eval_crop(data_config: Any, field: str = 'eval_crop', crop: str | None = None) -> None:
  """Errors for an eval crop (config.data.`field`, or `crop` given for it) that cannot run
  with this config."""
  crop = crop or data_config[field]
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


def eval_preprocess(data_config: Any, crop: str) -> Callable[[Any], dict[str, Any]]:
  """image -> {'image': uint8} (centre crop or whole image; 10 crops stacked) or, for
  multi-scale testing, {'scales': {side: {'image', 'valid'}}}."""
  size, resize_to = data_config.image_size, data_config.eval_resize
  if crop == 'multi_scale':
    sides = tuple(int(s) for s in data_config.multi_scale_sides)

    def multi_scale(image):
      scales = {}
      for side in sides:
        canvas, valid = image_ops.on_canvas(image, side)
        scales[str(side)] = {'image': canvas, 'valid': valid}
      return {'scales': scales}
    return multi_scale
  if crop == 'ten_crop':
    return lambda image: {'image': image_ops.ten_crop(
        image_ops.resize_shorter_side(image, resize_to), size)}
  if resize_to:
    return lambda image: {'image': image_ops.center_crop_of_resized(image, size, resize_to)}
  return lambda image: {'image': image_ops.resize(image, size)}


def eval_shapes(data_config: Any, crop: str) -> dict[str, Any]:
  """The shapes of `eval_preprocess`'s output (for the padding examples)."""
  size = data_config.image_size
  if crop == 'multi_scale':
    return {'scales': {str(int(s)): {'image': (image_ops.canvas_size(int(s)),) * 2 + (3,),
                                     'valid': (image_ops.canvas_size(int(s)),) * 2}
                       for s in data_config.multi_scale_sides}}
  return {'image': ((10,) if crop == 'ten_crop' else ()) + (size, size, 3)}
