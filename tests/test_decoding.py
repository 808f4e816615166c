"""Decoding (resnet_jax/data/decoding.py): simplejpeg for colour JPEGs, to exactly Pillow's
pixels at Pillow's DCT factor, read without Pillow; Pillow for the rest and for what
simplejpeg refuses."""
import io
import math

import numpy as np
import pytest
from PIL import Image
import simplejpeg

from resnet_jax.data import decoding
from resnet_jax.data import image_ops as ops
from resnet_jax.datasets import sample_imagenet
from tests.support import images


@pytest.fixture(scope='module')
def coffee():
  return sample_imagenet.photos()[4]  # coffee, 400x600


def test_the_dct_factor_is_pillows_draft_rule():
  """decoding.dct_factor, which picks simplejpeg's scale, against Pillow's own draft."""
  rng = np.random.default_rng(0)
  for height, width in ((375, 500), (1073, 1601), (64, 47)):
    data = images.encode(np.zeros((height, width, 3), np.uint8))
    for _ in range(40):
      scaled = tuple(rng.uniform(1, 1.2 * n) for n in (height, width))
      image = Image.open(io.BytesIO(data))
      box = image.draft('RGB', (math.ceil(scaled[1]), math.ceil(scaled[0])))[1]
      assert decoding.dct_factor((height, width), scaled) == round(width / box[2]), scaled


def test_colour_jpegs_decode_through_simplejpeg_to_pillows_pixels(coffee, monkeypatch):
  """simplejpeg reads colour JPEGs (Pillow never opens them) at the DCT factor Pillow's draft
  picks, to exactly Pillow's pixels; CMYK and grey JPEGs, and any JPEG simplejpeg refuses,
  go to Pillow."""
  calls = []
  decode_jpeg = simplejpeg.decode_jpeg
  monkeypatch.setattr(simplejpeg, 'decode_jpeg',
                      lambda *args, **kwargs: calls.append(kwargs) or decode_jpeg(*args, **kwargs))
  data = images.encode(images.view(coffee, 2400, 1600))
  open_image = Image.open
  monkeypatch.setattr(Image, 'open', lambda *a: pytest.fail('Pillow opened a colour JPEG'))
  for side in (1600, 480, 256, 128):  # DCT factors 1, 2, 4 and 8
    scaled = ops.scaled_shape((1600, 2400), side)
    image = open_image(io.BytesIO(data))
    image.draft('RGB', (scaled[1], scaled[0]))
    want = np.asarray(image.convert('RGB'))
    encoded = decoding.Encoded(data)
    assert encoded.shape == (1600, 2400)
    pixels, size = encoded.decode(scaled)
    np.testing.assert_array_equal(pixels, want)
    assert size == (1600 / (1600 // want.shape[0]), 2400 / (2400 // want.shape[1]))
  assert [(c['min_height'], c['min_width']) for c in calls] == [
      (1600, 2400), (800, 1200), (400, 600), (200, 300)]
  monkeypatch.setattr(Image, 'open', open_image)
  array = images.view(coffee, 300, 250)
  for mode in ('CMYK', 'L'):
    encoded = decoding.Encoded(images.encode(array, mode=mode))
    assert encoded.shape == (250, 300)
    assert encoded.decode()[0].shape == (250, 300, 3)
  assert len(calls) == 4  # Pillow decoded those

  def refuse(*args, **kwargs):
    raise ValueError('Corrupt JPEG data: 1 extraneous bytes before marker 0xd9')
  monkeypatch.setattr(simplejpeg, 'decode_jpeg', refuse)
  np.testing.assert_array_equal(decoding.Encoded(data).decode()[0], images.pillow_decode(data))


def test_a_colour_jpeg_too_big_for_pillow_is_refused_as_pillow_would(monkeypatch):
  """simplejpeg reads the header, but Pillow's decompression-bomb limit still holds: the same
  error Image.open raises, which the pipeline turns into an error naming the record."""
  data = images.encode(np.zeros((60, 80, 3), np.uint8))
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 2000)  # limit 4,000 pixels; the image: 4,800
  with pytest.raises(Image.DecompressionBombError) as ours:
    decoding.Encoded(data)
  with pytest.raises(Image.DecompressionBombError) as pillows:
    Image.open(io.BytesIO(data))
  assert str(ours.value) == str(pillows.value)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 2400)  # 4,800 is the limit: allowed
  assert decoding.Encoded(data).shape == (60, 80)
