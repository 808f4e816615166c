"""The host's image ops (resnet_jax/data/image_ops.py): crop-first resizes of encoded images
against an independent resize-then-crop reference, JPEG DCT downscaling, other image kinds,
the paper's scale augmentation and 10 crops, Inception crops, and the canvas of
fully-convolutional testing. numpy and Pillow only; decoding itself: test_decoding.py."""
import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
import simplejpeg

from resnet_jax.data import image_ops as ops
from resnet_jax.datasets import sample_imagenet
from tests.support import images


# Pillow and the reference interpolate in floating point and round: one grey level apart at most.
ONE_LEVEL = 1.001


def _bilinear(image, shape):
  """The reference resize of a whole image to `shape`: bilinear, half-pixel centres, edges
  clamped, no antialiasing (tf.image.resize's 'bilinear'); float64 out, not rounded."""
  x = image.astype(np.float64)
  for axis, n in enumerate(shape):
    size = x.shape[axis]
    position = (np.arange(n) + 0.5) * size / n - 0.5
    below = np.floor(position).astype(int)
    weight = (position - below).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    x = (np.take(x, np.clip(below, 0, size - 1), axis=axis) * (1 - weight) +
         np.take(x, np.clip(below + 1, 0, size - 1), axis=axis) * weight)
  return x


def _resized_then_cropped(data, size, side, top, left):
  """The reference of `scale_crop`: decode whole, resize whole, then slice the crop."""
  decoded = images.pillow_decode(data)
  resized = _bilinear(decoded, ops.scaled_shape(decoded.shape[:2], side))
  return resized[top:top + size, left:left + size]


@pytest.fixture(scope='module')
def photos():
  return sample_imagenet.photos()


@pytest.fixture(scope='module')
def photo(photos):
  return photos[1]  # flower.jpg, 427x640


def test_scaled_shapes_and_canvas_sizes():
  assert ops.scaled_shape((375, 500), 256) == (256, 341)  # 341.33
  assert ops.scaled_shape((333, 500), 256) == (256, 384)  # 384.38
  assert ops.scaled_shape((500, 333), 480) == (721, 480)  # 720.72
  assert ops.scaled_shape((224, 224), 256) == (256, 256)
  # Room for a 4:3 image either way up, in whole strides of 32.
  assert [ops.canvas_size(s) for s in (224, 256, 384, 480)] == [320, 352, 512, 640]
  assert ops.canvas_size(224, multiple=8) == 304  # 298.67 -> 299 -> 304


@pytest.mark.parametrize('shape', [(375, 500), (500, 333), (427, 640)])
def test_crop_first_agrees_with_resize_then_crop_on_real_photos(photo, shape):
  """Only the crop is sampled, from the image decoded whole (no DCT scaling at these
  scales): the reference's pixels up to uint8 rounding. A window one pixel off, or the
  image resized to a shorter side one pixel off, is far outside that tolerance."""
  data = images.encode(images.view(photo, shape[1], shape[0]))
  decoded = images.pillow_decode(data)
  rng = np.random.default_rng(9)
  for _ in range(12):
    side, top, left = ops.sample_scale_crop(rng, shape, 224, 256, 480)
    height, width = ops.scaled_shape(shape, side)
    assert 0 <= top <= height - 224 and 0 <= left <= width - 224
    got = ops.scale_crop(data, 224, side, top, left)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    resized = _bilinear(decoded, (height, width))
    want = resized[top:top + 224, left:left + 224]
    assert np.abs(got - want).max() < ONE_LEVEL, (side, top, left)
    # The same tolerance fails for a window a pixel off and for a wrong scale.
    dy = 1 if top + 225 <= height else -1
    dx = 1 if left + 225 <= width else -1
    for broken in (resized[top + dy:top + dy + 224, left:left + 224],
                   resized[top:top + 224, left + dx:left + dx + 224],
                   _bilinear(decoded, ops.scaled_shape(shape, side + 1))[top:top + 224,
                                                                         left:left + 224]):
      assert np.abs(got - broken).max() > 8 * ONE_LEVEL  # far outside the tolerance
  # scale_augment is scale_crop at the sampled geometry, and so is the centre crop.
  side, top, left = ops.sample_scale_crop(np.random.default_rng(3), shape, 224, 256, 480)
  np.testing.assert_array_equal(
      ops.scale_augment(data, 224, 256, 480, np.random.default_rng(3)),
      ops.scale_crop(data, 224, side, top, left))
  height, width = ops.scaled_shape(shape, 256)
  centre = ops.center_crop_of_resized(data, 224, 256)
  assert np.abs(centre - _bilinear(decoded, (height, width))[
      (height - 224) // 2:(height - 224) // 2 + 224,
      (width - 224) // 2:(width - 224) // 2 + 224]).max() < ONE_LEVEL
  # Whole-image resizes (less than halving, so also decoded whole): a square, a shorter side.
  assert np.abs(ops.resize(data, 224) - _bilinear(decoded, (224, 224))).max() < ONE_LEVEL
  shorter = ops.resize_shorter_side(data, 240)
  assert shorter.shape == ops.scaled_shape(shape, 240) + (3,)
  assert np.abs(shorter - _bilinear(decoded, shorter.shape[:2])).max() < ONE_LEVEL


def test_an_image_of_the_size_asked_is_not_resampled(photo):
  array = images.view(photo, 40, 40)
  np.testing.assert_array_equal(ops.resize(array, 40), array)
  np.testing.assert_array_equal(ops.resize(images.encode(array, 'PNG'), 40), array)


def _dct_factors(monkeypatch):
  """Spies on both JPEG decoders (simplejpeg for colour, Pillow's draft for the rest): the
  DCT reduction factor of each decode."""
  factors = []
  decode_jpeg = simplejpeg.decode_jpeg
  def simplejpeg_decode(data, *args, **kwargs):
    pixels = decode_jpeg(data, *args, **kwargs)
    factors.append(round(simplejpeg.decode_jpeg_header(data)[1] / pixels.shape[1]))
    return pixels
  draft = JpegImagePlugin.JpegImageFile.draft
  def pillow_draft(self, mode, size):
    width = self.size[0]
    result = draft(self, mode, size)
    factors.append(round(width / result[1][2]))
    return result
  monkeypatch.setattr(simplejpeg, 'decode_jpeg', simplejpeg_decode)
  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', pillow_draft)
  return factors


def test_large_images_decode_downscaled_by_the_jpeg_decoder(photos, monkeypatch):
  """A crop of a big JPEG resized to at most half its size: the decoder reduces it by 2, 4 or
  8 (averaging blocks instead of the bilinear filter), still close to the reference; a window
  two pixels off is not."""
  data = images.encode(images.view(photos[4], 2400, 1600))  # coffee, 400x600 -> 1600x2400
  decoded = images.pillow_decode(data)
  factors = _dct_factors(monkeypatch)
  for side in (256, 480):  # 0.16 and 0.3 of the 1600-pixel side
    got = ops.scale_crop(data, 224, side, 10, 20).astype(float)
    resized = _bilinear(decoded, ops.scaled_shape((1600, 2400), side))
    want = resized[10:234, 20:244]
    assert np.abs(got - want).mean() < 3.0, side  # measured: 1.6 (factor 4), 0.7 (factor 2)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
    for broken in (resized[12:236, 20:244], resized[10:234, 22:246]):
      assert np.abs(got - broken).mean() > 3.0
  assert factors == [4, 2]
  # A crop at full resolution or larger is decoded whole.
  factors.clear()
  ops.scale_crop(data, 224, 1600, 0, 0)
  assert factors == [1]
  # Pillow decodes a grey JPEG, by the same rule.
  factors.clear()
  grey = images.encode(images.view(photos[4], 2400, 1600), mode='L')
  for side in (256, 480):
    ops.scale_crop(grey, 224, side, 10, 20)
  assert factors == [4, 2]


def test_a_jpeg_whose_sides_the_dct_factor_does_not_divide_is_not_stretched(photos, monkeypatch):
  """1601x1073 reduced by 8 is 200.125x134.125 pixels, which the decoder rounds up to
  201x135: the far corner must be as close to the reference as for 1600x1072."""
  factors = _dct_factors(monkeypatch)
  errors = []
  for width, height in ((1600, 1072), (1601, 1073)):
    data = images.encode(images.view(photos[4], width, height))
    rows, columns = ops.scaled_shape((height, width), 128)
    got = ops.scale_crop(data, 96, 128, rows - 96, columns - 96)
    want = _resized_then_cropped(data, 96, 128, rows - 96, columns - 96)
    errors.append(np.abs(got - want).mean())
  assert factors == [8, 8]
  assert errors[1] < errors[0] + 1.0, errors  # today: 9.4 against 4.9


def _kinds(array):
  return {
      'png': lambda: images.encode(array, 'PNG'),
      'rgba_png': lambda: images.encode(
          np.dstack([array, np.full(array.shape[:2], 7, np.uint8)]), 'PNG'),
      'cmyk_jpeg': lambda: images.encode(array, mode='CMYK'),
      'grey_jpeg': lambda: images.encode(array, mode='L'),
      'grey_png': lambda: images.encode(array, 'PNG', mode='L'),
      'array': lambda: array,
      'grey_array': lambda: np.asarray(Image.fromarray(array).convert('L'))[..., None],
  }


@pytest.mark.parametrize('kind', list(_kinds(np.zeros((1, 1, 3), np.uint8))))
def test_other_images_take_the_same_ops_and_come_out_rgb(photo, kind):
  array = images.view(photo, 300, 250)
  image = _kinds(array)[kind]()
  grey = 'grey' in kind
  # What the image decodes to, on its own: the reference's input.
  if isinstance(image, np.ndarray):
    decoded = np.repeat(image, 3, axis=-1) if grey else image
  else:
    decoded = images.pillow_decode(image)
    assert Image.open(io.BytesIO(image)).mode == {
        'png': 'RGB', 'rgba_png': 'RGBA', 'cmyk_jpeg': 'CMYK', 'grey_jpeg': 'L',
        'grey_png': 'L'}[kind]
  # Sensible RGB: the photo's colours (CMYK converted back), or its grey in every channel.
  if grey:
    luma = np.asarray(Image.fromarray(array).convert('L')).astype(float)
    assert np.abs(decoded[..., 0] - luma).mean() < 2
  else:
    assert np.abs(decoded.astype(float) - array).mean() < 3
  rng = np.random.default_rng(4)
  side, top, left = ops.sample_scale_crop(np.random.default_rng(4), (250, 300), 224, 256, 300)
  outputs = {
      'scale_augment': ops.scale_augment(image, 224, 256, 300, rng),
      'scale_crop': ops.scale_crop(image, 224, side, top, left),
      'center_crop_of_resized': ops.center_crop_of_resized(image, 224, 256),
      'inception_crop': ops.inception_crop(image, 224, np.random.default_rng(4)),
      'resize': ops.resize(image, 64),
      'resize_shorter_side': ops.resize_shorter_side(image, 128),
      'on_canvas': ops.on_canvas(image, 64)[0],
  }
  shapes = {'resize': (64, 64, 3), 'resize_shorter_side': (128, 154, 3),
            'on_canvas': (96, 96, 3)}
  for name, out in outputs.items():
    assert out.dtype == np.uint8 and out.shape == shapes.get(name, (224, 224, 3)), name
    if grey:
      assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all(), name
    assert out.std() > 10, name  # the photo, not a blank
  np.testing.assert_array_equal(outputs['scale_augment'], outputs['scale_crop'])
  want = _bilinear(decoded, ops.scaled_shape((250, 300), side))[top:top + 224, left:left + 224]
  assert np.abs(outputs['scale_crop'] - want).max() < ONE_LEVEL


def _windows(seed, shape, num):
  rng = np.random.default_rng(seed)
  return np.array([ops.sample_inception_window(rng, shape) for _ in range(num)])


def test_inception_windows_lie_inside_with_the_paper_areas_and_aspect_ratios():
  height, width = shape = (300, 400)
  windows = _windows(0, shape, 3000)
  top, left, h, w = windows.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  # Area in [8%, 100%] and aspect w / h in [3/4, 4/3] up to the rounding of h and w to pixels.
  assert ((h + 0.5) * (w + 0.5) >= 0.08 * height * width).all()
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all() and ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  # The whole ranges are drawn: small and large windows, narrow and wide ones, anywhere.
  area, aspect = h * w / (height * width), w / h
  assert area.min() < 0.09 and area.max() > 0.9
  assert aspect.min() < 0.76 and aspect.max() > 1.32
  assert (top == 0).any() and (top + h == height).any()
  assert (left == 0).any() and (left + w == width).any()
  assert len({tuple(x) for x in windows}) > 2900
  # The aspect ratio is log-uniform: on a square image, symmetric about 1.
  _, _, h, w = _windows(2, (300, 300), 3000).T
  assert abs(np.log(w / h).mean()) < 0.01 and abs(np.median(np.log(w / h))) < 0.02
  # Deterministic in the generator's seed.
  np.testing.assert_array_equal(_windows(0, shape, 50), windows[:50])
  assert not np.array_equal(_windows(1, shape, 50), windows[:50])


def test_inception_windows_fall_back_to_the_whole_image():
  """A 10x1000 image has no 4:3 window of 8% of its area: 10 draws fail, the whole image."""
  assert (_windows(0, (10, 1000), 20) == [0, 0, 10, 1000]).all()
  # A square image fits most draws: the whole image only when 10 draws in a row do not fit.
  fallbacks = (_windows(0, (64, 64), 2000) == [0, 0, 64, 64]).all(1)
  assert fallbacks.sum() < 20


def test_inception_crop_resizes_its_window(photo):
  """The window resized to size x size: the reference resize of the window's pixels, away
  from its edges (where crop first samples the neighbours outside it, which the reference,
  resizing the window alone, clamps)."""
  data = images.encode(images.view(photo, 200, 150), 'PNG')
  decoded = images.pillow_decode(data)
  for seed in range(6):
    top, left, h, w = ops.sample_inception_window(np.random.default_rng(seed), (150, 200))
    got = ops.inception_crop(data, 64, np.random.default_rng(seed))
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    want = _bilinear(decoded[top:top + h, left:left + w], (64, 64))
    margin = int(np.ceil(64 / min(h, w))) + 1
    inner = (slice(margin, -margin),) * 2
    assert np.abs(got[inner] - want[inner]).max() < ONE_LEVEL, (seed, top, left, h, w)
    off = _bilinear(decoded[top + 2:top + h + 2, left:left + w], (64, 64))
    assert np.abs(got[inner] - off[inner]).mean() > 1
  assert not np.array_equal(ops.inception_crop(data, 64, np.random.default_rng(0)),
                            ops.inception_crop(data, 64, np.random.default_rng(1)))


def test_ten_crop_geometry():
  image = np.arange(6 * 8, dtype=np.float32).reshape(6, 8, 1)
  crops = ops.ten_crop(image, 4)
  assert crops.shape == (10, 4, 4, 1)
  expected = [image[0:4, 0:4], image[0:4, 4:8], image[2:6, 0:4], image[2:6, 4:8],
              image[1:5, 2:6]]
  for i, crop in enumerate(expected):
    np.testing.assert_array_equal(crops[i], crop)
    np.testing.assert_array_equal(crops[i + 5], crop[:, ::-1])  # the mirrored views
  np.testing.assert_array_equal(ops.center_crop(image, 4), expected[4])


def test_scale_augmentation_samples_every_shorter_side_in_range_and_no_other():
  """The paper's S ~ U[256, 480], both ends included (225 values)."""
  sides = ops.sample_shorter_sides(np.random.default_rng(7), 4000, 256, 480)
  assert sides.shape == (4000,)
  assert sides.min() == 256 and sides.max() == 480
  counts = np.bincount(sides - 256, minlength=225)
  assert len(counts) == 225 and counts.min() > 0  # every value, nothing outside
  assert abs(sides.mean() - 368) < 4  # uniform: mean (256 + 480) / 2
  # A narrow range shows the ends as clearly.
  assert set(ops.sample_shorter_sides(np.random.default_rng(1), 200, 30, 32)) == {30, 31, 32}
  # The crop's place in the image resized to S: uniform over every position.
  shape = (300, 400)
  rng = np.random.default_rng(5)
  tops, lefts, heights, widths, drawn = [], [], [], [], set()
  for _ in range(600):
    side, top, left = ops.sample_scale_crop(rng, shape, 224, 256, 260)
    height, width = ops.scaled_shape(shape, side)
    drawn.add(side)
    tops.append(top)
    lefts.append(left)
    heights.append(height)
    widths.append(width)
  assert drawn == {256, 257, 258, 259, 260}
  assert all(0 <= t <= h - 224 for t, h in zip(tops, heights))
  assert all(0 <= l <= w - 224 for l, w in zip(lefts, widths))
  assert min(tops) == 0 and max(t - (h - 224) for t, h in zip(tops, heights)) == 0
  assert min(lefts) == 0 and max(l - (w - 224) for l, w in zip(lefts, widths)) == 0
  assert abs(np.mean([t / (h - 224) for t, h in zip(tops, heights)]) - 0.5) < 0.05
  assert abs(np.mean([l / (w - 224) for l, w in zip(lefts, widths)]) - 0.5) < 0.05
  # Every position of a small range is drawn.
  assert {ops.sample_scale_crop(rng, (32, 34), 30, 32, 32)[2] for _ in range(200)} == {
      0, 1, 2, 3, 4}


@pytest.mark.parametrize('shape,expected', [((375, 500), (224, 299)), ((500, 375), (299, 224)),
                                            ((224, 600), (224, 320))])
def test_fully_convolutional_testing_puts_the_whole_image_on_a_canvas(shape, expected):
  image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
  canvas, valid = ops.on_canvas(image, 224)
  assert ops.canvas_size(224) == 320 and canvas.shape == (320, 320, 3) and valid.shape == (320, 320)
  assert canvas.dtype == np.uint8 and valid.dtype == bool
  rows, columns = np.nonzero(valid)
  assert (rows.max() + 1, columns.max() + 1) == expected and rows.min() == columns.min() == 0
  assert valid[:expected[0], :expected[1]].all()
  assert not canvas[~valid].any()  # zeros around the image
  # The image resized to shorter side 224, its longer side centre-cropped to the canvas.
  resized = ops.resize_shorter_side(image, 224)
  top, left = (resized.shape[0] - expected[0]) // 2, (resized.shape[1] - expected[1]) // 2
  np.testing.assert_array_equal(canvas[:expected[0], :expected[1]],
                                resized[top:top + expected[0], left:left + expected[1]])
