"""Small, pure image ops for the host: encoded bytes or uint8 arrays in, uint8 HWC out.

Every resize is one affine warp (OpenCV) with bilinear sampling at
half-integer pixel centres and no antialiasing (what tf.image.resize and the
standard ImageNet recipes do). A crop of a resized image is therefore the
same transform restricted to the crop, so crops are computed crop first:
only the crop's pixels are sampled, from the image decoded at the smallest
JPEG DCT scale that still has at least the resized image's resolution
(`decoding.py`). Random geometry comes from a numpy Generator the caller
seeds.
"""
from __future__ import annotations

import cv2
import numpy as np

from resnet_jax.data.decoding import Encoded

# ImageNet RGB statistics on the [0, 1] scale (fb.resnet.torch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scaled_shape(shape: tuple[int, int], side: int) -> tuple[int, int]:
  """(height, width) of an image of `shape` resized to shorter side `side`."""
  height, width = shape
  short = min(height, width)
  return max(side, round(height * side / short)), max(side, round(width * side / short))


def resample(image: Encoded, out_shape: tuple[int, int], scaled: tuple[float, float],
             top: float = 0, left: float = 0) -> np.ndarray:
  """The `out_shape` crop at (top, left) of `image` resized to `scaled` (height, width),
  sampling only the crop: uint8 RGB.

  For a JPEG the decoder first reduces the image by the largest DCT factor
  that keeps it at least `scaled`: a factor of r averages r x r blocks, and
  the sampling positions are mapped onto the reduced image.
  """
  pixels, reduced = image.decode(scaled)
  scale_y, scale_x = reduced[0] / scaled[0], reduced[1] / scaled[1]
  # Output pixel x (centre x + 0.5) samples the resized image at left + x + 0.5, which is
  # source position (left + x + 0.5) * scale, i.e. pixel index (left + x + 0.5) * scale - 0.5;
  # edges repeat, as tf.image.resize's do. OpenCV's warpAffine samples 8x faster than
  # Pillow's transform (docs/performance.md).
  matrix = np.array([[scale_x, 0, (left + 0.5) * scale_x - 0.5],
                     [0, scale_y, (top + 0.5) * scale_y - 0.5]], np.float64)
  return cv2.warpAffine(pixels, matrix, (out_shape[1], out_shape[0]),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)


def resize(data: bytes | np.ndarray, size: int) -> np.ndarray:
  """The whole image resized to size x size (unchanged if it has that size): uint8 RGB."""
  image = Encoded(data)
  if image.shape == (size, size):
    return image.decode()[0]
  return resample(image, (size, size), (size, size))


def resize_shorter_side(data: bytes | np.ndarray, side: int) -> np.ndarray:
  image = Encoded(data)
  scaled = scaled_shape(image.shape, side)
  return resample(image, scaled, scaled)


def sample_shorter_sides(rng: np.random.Generator, num: int | tuple[int, ...] | None,
                         min_side: int, max_side: int) -> np.ndarray:
  """Shorter sides drawn uniformly from the integers min_side..max_side, both included."""
  return rng.integers(min_side, max_side + 1, size=num)


def sample_scale_crop(rng: np.random.Generator, shape: tuple[int, int], size: int,
                      min_side: int, max_side: int) -> tuple[int, int, int]:
  """The paper's scale augmentation (Sec. 3.4) for an image of `shape`: the shorter side S,
  uniform in [min_side, max_side], and a uniformly placed size x size crop of the image
  resized to S, as (side, top, left)."""
  side = int(sample_shorter_sides(rng, None, min_side, max_side))
  height, width = scaled_shape(shape, side)
  return side, int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def scale_crop(data: bytes | np.ndarray, size: int, side: int, top: int, left: int) -> np.ndarray:
  """The size x size crop at (top, left) of the image resized to shorter side `side`."""
  image = Encoded(data)
  return resample(image, (size, size), scaled_shape(image.shape, side), top, left)


def scale_augment(data: bytes | np.ndarray, size: int, min_side: int, max_side: int,
                  rng: np.random.Generator) -> np.ndarray:
  """The paper's scale augmentation of one image, crop first: uint8 size x size."""
  image = Encoded(data)
  side, top, left = sample_scale_crop(rng, image.shape, size, min_side, max_side)
  return resample(image, (size, size), scaled_shape(image.shape, side), top, left)


def center_crop_of_resized(data: bytes | np.ndarray, size: int, side: int) -> np.ndarray:
  """The centre size x size crop of the image resized to shorter side `side`, crop first."""
  image = Encoded(data)
  height, width = scaled = scaled_shape(image.shape, side)
  return resample(image, (size, size), scaled, (height - size) // 2, (width - size) // 2)


def sample_inception_window(rng: np.random.Generator, shape: tuple[int, int],
                            area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """A random window (top, left, height, width) covering area_range of the image with a
  log-uniform aspect ratio in aspect_range; the whole image if 10 draws do not fit."""
  height, width = shape
  for _ in range(attempts):
    area = height * width * rng.uniform(*area_range)
    aspect = np.exp(rng.uniform(np.log(aspect_range[0]), np.log(aspect_range[1])))
    h, w = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
    if 0 < h <= height and 0 < w <= width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return 0, 0, height, width


def inception_crop(data: bytes | np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Inception-style random-resized crop, sampling only the window: uint8 size x size."""
  image = Encoded(data)
  height, width = image.shape
  top, left, h, w = sample_inception_window(rng, (height, width))
  # The window resized to size x size is the crop at (top, left) * s of the image scaled by s.
  return resample(image, (size, size), (height * size / h, width * size / w),
                  top * size / h, left * size / w)


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The paper's 10-crop testing: four corners and the centre, and their flips -> (10, s, s, C)."""
  height, width = image.shape[:2]
  corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
             ((height - size) // 2, (width - size) // 2)]
  crops = np.stack([image[t:t + size, l:l + size] for t, l in corners])
  return np.concatenate([crops, crops[:, :, ::-1]])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  height, width = image.shape[:2]
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


def canvas_size(side: int, multiple: int = 32) -> int:
  """The square canvas of fully-convolutional testing at shorter side `side`: room for a
  4:3 image either way up, in whole steps of the network's stride."""
  return -(-round(side * 4 / 3) // multiple) * multiple


def on_canvas(data: bytes | np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
  """The image resized to shorter side `side` (the longer side centre-cropped to the canvas
  if it is longer than 4:3), at the top left of a square uint8 canvas, and where it is."""
  canvas = canvas_size(side)
  image = Encoded(data)
  scaled = scaled_shape(image.shape, side)
  height, width = min(scaled[0], canvas), min(scaled[1], canvas)
  crop = resample(image, (height, width), scaled, (scaled[0] - height) // 2,
                  (scaled[1] - width) // 2)
  out = np.zeros((canvas, canvas, 3), np.uint8)
  out[:height, :width] = crop
  valid = np.zeros((canvas, canvas), bool)
  valid[:height, :width] = True
  return out, valid
