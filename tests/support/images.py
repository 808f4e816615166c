"""Test images: encode arrays as JPEG or PNG, decode them with Pillow alone, resize photos."""
import io

import numpy as np
from PIL import Image


def encode(array, fmt='JPEG', mode=None):
  """`array` encoded as `fmt` (quality 90), converted to Pillow `mode` first if given."""
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, quality=90)
  return buffer.getvalue()


def pillow_decode(data):
  """The whole image at full resolution, RGB, straight from Pillow (no draft)."""
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def view(photo, width, height):
  """`photo` resized to width x height (bilinear), as a test image of that size."""
  return np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
