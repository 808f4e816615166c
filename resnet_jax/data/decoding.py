"""Encoded images to uint8 RGB pixels, decoded only as far as a crop needs.

simplejpeg reads colour JPEGs, the bulk of ImageNet, header and pixels
(libjpeg-turbo at 1.6x Pillow's rate: docs/performance.md); Pillow reads
everything else (PNG, CMYK and grey JPEGs, uint8 arrays, and any JPEG that
simplejpeg finds fault with). A JPEG is decoded at the largest DCT reduction
(1/2, 1/4, 1/8) that keeps it at least the size the crop is resized to: a
factor of r averages r x r blocks, at a fraction of a full decode's cost.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
import simplejpeg


def open_image(data: bytes | np.ndarray) -> Image.Image:
  """A lazily decoded Pillow image: encoded bytes (JPEG, PNG, ...) or a uint8 HW[C] array."""
  if isinstance(data, np.ndarray):
    return Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
  return Image.open(io.BytesIO(data))


def image_shape(image: Image.Image) -> tuple[int, int]:
  """(height, width) at full resolution."""
  return image.size[1], image.size[0]


def dct_factor(shape: tuple[int, int], scaled: tuple[float, float]) -> int:
  """The largest JPEG DCT reduction (8, 4, 2 or 1) that keeps an image of `shape` at
  least `scaled` (height, width): the rule of Pillow's `draft`."""
  ratio = min(shape[0] // math.ceil(scaled[0]), shape[1] // math.ceil(scaled[1]))
  return next((factor for factor in (8, 4, 2) if ratio >= factor), 1)


def _rgb(image: Image.Image) -> Image.Image:
  """RGB of any mode (grey repeated, CMYK converted, alpha dropped)."""
  return image if image.mode == 'RGB' else image.convert('RGB')


class Encoded:
  """An image as stored (encoded bytes, or a uint8 HW[C] array), not yet decoded: its
  full-resolution `shape`, read from the header alone, and `decode`.

  A colour JPEG, the bulk of ImageNet, is read by simplejpeg alone (its
  header in 2 us, where Pillow's parser took 90 us of a 0.9 ms example); anything
  else (PNG, CMYK and grey JPEGs, arrays) is opened with Pillow.
  """

  def __init__(self, data: bytes | np.ndarray):
    self.data = data
    self._image = None  # Pillow's lazily decoded image, for all but colour JPEGs
    colorspace = None
    if not isinstance(data, np.ndarray):
      try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
      except ValueError:
        pass  # not a JPEG, or a header simplejpeg cannot read: Pillow's
    if colorspace in ('YCbCr', 'RGB'):
      self.shape = (height, width)
      limit = Image.MAX_IMAGE_PIXELS and 2 * Image.MAX_IMAGE_PIXELS
      if limit and height * width > limit:  # the check Image.open would have made
        raise Image.DecompressionBombError(
            f'Image size ({height * width} pixels) exceeds limit of {limit} pixels, could be '
            'decompression bomb DOS attack.')
    else:
      self._image = open_image(data)
      self.shape = image_shape(self._image)

  def decode(self, scaled: tuple[float, float] | None = None
             ) -> tuple[np.ndarray, tuple[float, float]]:
    """uint8 RGB, a JPEG at the largest DCT factor (1, 1/2, 1/4, 1/8) that keeps it at
    least `scaled` (height, width) if given, and the decoded image's exact size: a factor
    that does not divide a side gives a last row or column that is only partly image (1601
    / 8 = 200.125 is decoded as 201)."""
    if self._image is None:
      height, width = self.shape
      factor = dct_factor(self.shape, scaled) if scaled is not None else 1
      try:  # simplejpeg picks the same factor from the size it is asked for
        return (simplejpeg.decode_jpeg(self.data, 'RGB', min_height=-(-height // factor),
                                       min_width=-(-width // factor)),
                (height / factor, width / factor))
      except ValueError:  # e.g. truncated: Pillow decodes what it can read, or names the fault
        self._image = open_image(self.data)
    image, size = self._image, self.shape
    if image.format == 'JPEG' and scaled is not None:
      # Pillow's draft sizes the image as its decoder will.
      drafted = image.draft('RGB', (math.ceil(scaled[1]), math.ceil(scaled[0])))
      if drafted:
        size = (drafted[1][3], drafted[1][2])
    return np.asarray(_rgb(image)), size
