"""Small, pure TensorFlow image ops for the host side of the input pipeline.

The host does what needs the encoded image (decoding, cropping, resizing) and
hands uint8 images to the devices; normalisation, flips, PCA lighting and the
CIFAR pad-and-crop run inside the jitted steps (resnet_jax/augment.py). Each
op takes and returns one example's image (HWC). Random ops are stateless:
they take a `seed` (a shape-[2] int tensor), so a pipeline is deterministic
for a seed however many threads run it.

The paper's scale augmentation is computed crop first: the 224x224 crop of
the image resized to shorter side S is mapped back to a window of source
pixels, only that window is decoded (`decode_and_crop_jpeg`, with the JPEG
decoder's DCT downscaling where the window is at least twice the output) and
only the window is resized. Non-JPEG images take the resize-then-crop path.
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
# The JPEG decoder's DCT downscaling factors.
DCT_RATIOS = (1, 2, 4, 8)


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


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float [0, 255] (a resize's output) -> uint8, rounded to the nearest value."""
  return tf.saturate_cast(image + 0.5, tf.uint8)


def _bilinear(image: tf.Tensor, size: tf.Tensor | tuple[int, int]) -> tf.Tensor:
  """Bilinear resize with pixel centres at half-integers; float [0, 255] out.

  No antialiasing, as in the standard ImageNet recipes: at the paper's
  scales (shorter side 256 to 480 from about 375) it barely aliases, and the
  antialiased filter costs several times more per image.
  """
  return tf.image.resize(image, size, method='bilinear')


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 -> uint8 of size x size, unless already that shape."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return to_uint8(_bilinear(image, (size, size)))


def scaled_shape(shape: tf.Tensor, side: tf.Tensor | int) -> tf.Tensor:
  """(height, width) of an image of `shape` resized to shorter side `side`."""
  shape = tf.cast(shape[:2], tf.float32)
  new_shape = tf.cast(tf.round(shape * tf.cast(side, tf.float32) / tf.reduce_min(shape)),
                      tf.int32)
  return tf.maximum(new_shape, tf.cast(side, tf.int32))  # guard against rounding down


def resize_shorter_side(image: tf.Tensor, side: tf.Tensor | int) -> tf.Tensor:
  """Resizes so that the shorter side is `side`; float [0, 255] out."""
  return _bilinear(image, scaled_shape(tf.shape(image), side))


def sample_shorter_sides(seed: tf.Tensor, num: int | tuple[int, ...], min_side: int,
                         max_side: int) -> tf.Tensor:
  """Shorter sides drawn uniformly from the integers min_side..max_side, both included."""
  shape = (num,) if isinstance(num, int) else num
  return tf.random.stateless_uniform(shape, seed, min_side, max_side + 1, dtype=tf.int32)


def sample_scale_crop(seed: tf.Tensor, shape: tf.Tensor, size: int, min_side: int,
                      max_side: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The paper's scale augmentation (Sec. 3.4) for an image of `shape`: the shorter side S,
  uniform in [min_side, max_side], and a uniformly placed size x size crop of the
  image resized to S, as (side, top, left)."""
  side_seed, top_seed, left_seed = split_seed(seed, 3)
  side = sample_shorter_sides(side_seed, (), min_side, max_side)
  height, width = tf.unstack(scaled_shape(shape, side))
  top = tf.random.stateless_uniform((), top_seed, 0, height - size + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform((), left_seed, 0, width - size + 1, dtype=tf.int32)
  return side, top, left


def scale_and_crop(image: tf.Tensor, size: int, side: tf.Tensor, top: tf.Tensor,
                   left: tf.Tensor) -> tf.Tensor:
  """Resize-then-crop: the whole uint8 image to shorter side `side`, then the crop at
  (top, left). The reference that `crop_first_scale` computes faster; uint8 out."""
  resized = resize_shorter_side(decode(image), side)
  return to_uint8(resized[top:top + size, left:left + size])


def source_window(shape: tf.Tensor, size: int, side: tf.Tensor, top: tf.Tensor, left: tf.Tensor,
                  ratio: int = 1) -> tuple[tf.Tensor, tf.Tensor]:
  """Where the size x size crop at (top, left) of an image of `shape` resized to shorter
  side `side` lies in the image decoded with DCT ratio `ratio`: (start, extent) in whole
  pixels, (row, column) each. The exact window is [top / s, (top + size) / s) at
  scale s; rounding moves its edges by at most half a pixel."""
  shape = tf.cast(shape[:2], tf.int32)
  scale = tf.cast(scaled_shape(shape, side), tf.float32) / tf.cast(shape, tf.float32) * ratio
  dims = -(-shape // ratio)  # the decoder rounds up
  offset = tf.cast(tf.stack([top, left]), tf.float32)
  start = tf.minimum(tf.cast(tf.round(offset / scale), tf.int32), dims - 1)
  extent = tf.clip_by_value(tf.cast(tf.round(size / scale), tf.int32), 1, dims - start)
  return start, extent


def dct_ratio(shape: tf.Tensor, side: tf.Tensor) -> tf.Tensor:
  """Index into DCT_RATIOS of the largest JPEG DCT downscaling that leaves the crop's window
  at least the output's size (1 unless the window is at least twice the output)."""
  scale = tf.cast(scaled_shape(shape, side), tf.float32) / tf.cast(shape[:2], tf.float32)
  return tf.reduce_sum(tf.cast(
      tf.reduce_min(scale) * tf.constant(DCT_RATIOS[1:], tf.float32) <= 1.0, tf.int32))


def crop_first_scale(encoded: tf.Tensor, size: int, side: tf.Tensor, top: tf.Tensor,
                     left: tf.Tensor) -> tf.Tensor:
  """`scale_and_crop` of a JPEG, decoding and resizing only the crop's window; uint8 out.

  The window (`source_window`) is decoded, by the JPEG decoder's DCT
  downscaling by r in 2, 4, 8 where it is at least twice the output (r x r
  blocks averaged), and resized to size x size: the reference up to
  interpolation and the sub-pixel rounding of the window's edges.
  """
  shape = tf.io.extract_jpeg_shape(encoded)

  def decode_with(ratio: int):
    def fn():
      start, extent = source_window(shape, size, side, top, left, ratio)
      window = tf.io.decode_and_crop_jpeg(encoded, tf.concat([start, extent], 0), channels=3,
                                          ratio=ratio)
      return _bilinear(window, (size, size))
    return fn

  image = tf.switch_case(dct_ratio(shape, side), [decode_with(r) for r in DCT_RATIOS])
  return to_uint8(tf.ensure_shape(image, (size, size, 3)))


def scale_augment(image: tf.Tensor, size: int, min_side: int, max_side: int,
                  seed: tf.Tensor) -> tf.Tensor:
  """The paper's scale augmentation of one image (encoded or not): uint8 size x size.

  JPEGs go crop first (`crop_first_scale`); PNGs and decoded images are resized
  whole, then cropped, with the same random geometry.
  """
  if image.dtype != tf.string:
    side, top, left = sample_scale_crop(seed, tf.shape(image), size, min_side, max_side)
    return scale_and_crop(image, size, side, top, left)

  def jpeg():
    side, top, left = sample_scale_crop(seed, tf.io.extract_jpeg_shape(image), size, min_side,
                                        max_side)
    return crop_first_scale(image, size, side, top, left)

  def other():
    decoded = decode(image)
    side, top, left = sample_scale_crop(seed, tf.shape(decoded), size, min_side, max_side)
    return scale_and_crop(decoded, size, side, top, left)

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image), jpeg, other), (size, size, 3))


def center_crop_of_resized(image: tf.Tensor, size: int, side: int) -> tf.Tensor:
  """The centre size x size crop of the image resized to shorter side `side`; uint8 out.
  JPEGs decode and resize only that crop's window."""
  def geometry(shape):
    height, width = tf.unstack(scaled_shape(shape, side))
    return (height - size) // 2, (width - size) // 2

  if image.dtype != tf.string:
    return scale_and_crop(image, size, side, *geometry(tf.shape(image)))

  def jpeg():
    return crop_first_scale(image, size, side, *geometry(tf.io.extract_jpeg_shape(image)))

  def other():
    decoded = decode(image)
    return scale_and_crop(decoded, size, side, *geometry(tf.shape(decoded)))

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image), jpeg, other), (size, size, 3))


def inception_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor,
                   area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception-style random-resized crop, decoding only the crop (fused JPEG decode); uint8."""
  shape = tf.image.extract_jpeg_shape(encoded)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros((0, 0, 4), tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=aspect_range, area_range=area_range, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
  return to_uint8(_bilinear(image, (size, size)))


def canvas_size(side: int, multiple: int = 32) -> int:
  """The square canvas of fully-convolutional testing at shorter side `side`: room for a
  4:3 image either way up, in whole steps of the network's stride."""
  return -(-round(side * 4 / 3) // multiple) * multiple


def on_canvas(image: tf.Tensor, side: int) -> tuple[tf.Tensor, tf.Tensor]:
  """The image resized to shorter side `side` (the longer side centre-cropped to the canvas
  if it is longer than 4:3), at the top left of a square uint8 canvas, and where it is."""
  canvas = canvas_size(side)
  resized = resize_shorter_side(decode(image), side)
  height, width = tf.minimum(tf.shape(resized)[0], canvas), tf.minimum(tf.shape(resized)[1], canvas)
  top, left = (tf.shape(resized)[0] - height) // 2, (tf.shape(resized)[1] - width) // 2
  resized = to_uint8(resized[top:top + height, left:left + width])
  padding = [[0, canvas - height], [0, canvas - width], [0, 0]]
  valid = tf.pad(tf.ones((height, width), tf.bool), padding[:2])
  return tf.ensure_shape(tf.pad(resized, padding), (canvas, canvas, 3)), tf.ensure_shape(
      valid, (canvas, canvas))


def ten_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The paper's 10-crop testing: four corners and the centre, and their flips -> (10, s, s, C)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
             ((height - size) // 2, (width - size) // 2)]
  crops = tf.stack([image[t:t + size, l:l + size] for t, l in corners])
  crops = tf.ensure_shape(crops, (5, size, size, image.shape[-1]))
  return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]
