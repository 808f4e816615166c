"""Small, pure TensorFlow image ops: the paper's augmentation and evaluation crops.

Each op takes and returns one example's image (HWC). Random ops are
stateless: they take a `seed` (a shape-[2] int tensor), so a pipeline is
deterministic for a seed however many threads run it, and a resumed run sees
exactly the augmentation an uninterrupted one would have seen.
"""
from __future__ import annotations

import tensorflow as tf

# ImageNet RGB statistics on the [0, 1] scale (fb.resnet.torch, AlexNet lighting noise).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """`num` independent stateless seeds from one."""
  return list(tf.unstack(tf.random.experimental.stateless_split(seed, num)))


def decode(image: tf.Tensor) -> tf.Tensor:
  """Encoded bytes or a uint8 array -> uint8 RGB (grey images repeated to 3 channels)."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return image


def to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return tf.cast(image, tf.float32) / 255.0


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes to size x size (bilinear) unless the image already has that shape."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return tf.image.resize(image, (size, size), method='bilinear', antialias=True)


def resize_shorter_side(image: tf.Tensor, size: tf.Tensor | int) -> tf.Tensor:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  new_shape = tf.maximum(new_shape, tf.cast(size, tf.int32))  # guard against rounding down
  return tf.image.resize(image, new_shape, method='bilinear', antialias=True)


def pad_and_random_crop(image: tf.Tensor, padding: int, seed: tf.Tensor) -> tf.Tensor:
  """CIFAR augmentation (paper Sec. 4.2): zero-pad `padding` pixels, crop the original size."""
  height, width, channels = image.shape
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(padded, (height, width, channels), seed=seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


def sample_shorter_sides(seed: tf.Tensor, num: int | tuple[int, ...], min_side: int,
                         max_side: int) -> tf.Tensor:
  """Shorter sides drawn uniformly from the integers min_side..max_side, both included."""
  shape = (num,) if isinstance(num, int) else num
  return tf.random.stateless_uniform(shape, seed, min_side, max_side + 1, dtype=tf.int32)


def random_scale_and_crop(image: tf.Tensor, size: int, min_side: int, max_side: int,
                          seed: tf.Tensor) -> tf.Tensor:
  """The paper's ImageNet scale augmentation (Sec. 3.4): shorter side uniform in
  [min_side, max_side], then a random size x size crop."""
  side_seed, crop_seed = split_seed(seed, 2)
  side = sample_shorter_sides(side_seed, (), min_side, max_side)
  image = resize_shorter_side(image, side)
  return tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)


def pca_lighting(image: tf.Tensor, seed: tf.Tensor, alpha_std: float = 0.1) -> tf.Tensor:
  """AlexNet-style colour augmentation: add PCA components of ImageNet RGB, scaled by
  eigenvalue times N(0, alpha_std), to every pixel of a [0, 1] image."""
  alpha = tf.random.stateless_normal((3,), seed, stddev=alpha_std)
  eigvec = tf.constant(IMAGENET_EIGVEC, tf.float32)
  rgb = tf.linalg.matvec(eigvec, alpha * tf.constant(IMAGENET_EIGVAL, tf.float32))
  return image + rgb


def inception_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor,
                   area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception-style random-resized crop, decoding only the crop (fused JPEG decode)."""
  shape = tf.image.extract_jpeg_shape(encoded)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros((0, 0, 4), tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=aspect_range, area_range=area_range, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
  return tf.image.resize(image, (size, size), method='bilinear', antialias=True)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


def ten_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The paper's 10-crop testing: four corners and the centre, and their flips -> (10, s, s, C)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
             ((height - size) // 2, (width - size) // 2)]
  crops = tf.stack([image[t:t + size, l:l + size] for t, l in corners])
  crops = tf.ensure_shape(crops, (5, size, size, image.shape[-1]))
  return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)
