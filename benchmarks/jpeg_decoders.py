"""JPEG decoders on real-photo JPEGs: which one the host pipeline should use.

    python benchmarks/jpeg_decoders.py [--images 400] [--repeats 5] [--long_side 500]

Each candidate (all built on libjpeg-turbo) decodes every image to RGB at the
DCT scale that the paper's scale augmentation needs for a shorter side S
(full size at S = 256..480 for ~500x375 images; 1/2 or 1/4 for big photos),
in one process and one thread, candidates alternating round by round; the
median round is printed as images per second, with each one's ratio to
Pillow. Candidates that are not installed are listed as such.

A third case asks for an Inception crop's window (8%-100% of the image,
drawn as the pipeline draws it): TensorFlow's `decode_and_crop_jpeg`, called
per image from Python as a grain worker would call it, decodes only the
window; PyTurboJPEG (where the system has libturbojpeg) crops the JPEG
losslessly to the window's whole MCUs and decodes that; the others decode the
whole image and slice it. It tells whether either way of decoding less pays
(TensorFlow where it is installed: the `prepare` extra). TensorFlow decodes
with libjpeg's fast integer IDCT by default, as `simplejpeg (fast IDCT)` does;
the others with the accurate one.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np


Window = tuple[int, int, int, int]  # top, left, height, width


def _crop(image: np.ndarray, window: Window | None) -> np.ndarray:
  if window is None:
    return image
  top, left, height, width = window
  return image[top:top + height, left:left + width]


def _pillow(data: bytes, reduce: int, window: Window | None = None) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = Image.open(io.BytesIO(data))
  image.draft('RGB', (image.size[0] // reduce, image.size[1] // reduce))
  return _crop(np.asarray(image.convert('RGB')), window)


def _simplejpeg(data: bytes, reduce: int, window: Window | None = None,
                fastdct: bool = False) -> np.ndarray:
  import simplejpeg  # pylint: disable=import-outside-toplevel
  height, width, _, _ = simplejpeg.decode_jpeg_header(data)
  return _crop(simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=fastdct,
                                      min_height=height // reduce, min_width=width // reduce),
               window)


def _simplejpeg_fast(data: bytes, reduce: int, window: Window | None = None) -> np.ndarray:
  """libjpeg's fast integer IDCT (simplejpeg's `fastdct`), TensorFlow's default; the
  pipeline decodes with the accurate one."""
  return _simplejpeg(data, reduce, window, fastdct=True)


def _opencv(data: bytes, reduce: int, window: Window | None = None) -> np.ndarray:
  import cv2  # pylint: disable=import-outside-toplevel
  flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
          8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
  return _crop(cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag),
                           cv2.COLOR_BGR2RGB), window)


_TURBO = []


def _turbojpeg(data: bytes, reduce: int, window: Window | None = None) -> np.ndarray:
  """A window by TurboJPEG's lossless crop (on whole 16-pixel MCUs), then decoded."""
  import turbojpeg  # pylint: disable=import-outside-toplevel
  if not _TURBO:
    _TURBO.append(turbojpeg.TurboJPEG())
  if window is not None:
    top, left, height, width = window
    full_width, full_height, _, _ = _TURBO[0].decode_header(data)
    top0, left0 = top // 16 * 16, left // 16 * 16
    data = _TURBO[0].crop(data, left0, top0, min(left + width, full_width) - left0,
                          min(top + height, full_height) - top0)
    window = (top - top0, left - left0, height, width)
  return _crop(_TURBO[0].decode(data, pixel_format=turbojpeg.TJPF_RGB,
                                scaling_factor=(1, reduce)), window)


_TF = []


def _tensorflow(data: bytes, reduce: int, window: Window | None = None) -> np.ndarray:
  """Eager, on one thread; only the window's rows and columns where one is given."""
  if not _TF:  # set up once, outside the timed calls (asking TensorFlow costs 13 us)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    _TF.append(tf)
  tf = _TF[0]
  if window is None:
    return tf.io.decode_jpeg(data, channels=3, ratio=reduce).numpy()
  return tf.io.decode_and_crop_jpeg(data, list(window), channels=3).numpy()


CANDIDATES = {'pillow (draft)': _pillow, 'simplejpeg': _simplejpeg,
              'simplejpeg (fast IDCT)': _simplejpeg_fast,
              'opencv (IMREAD_REDUCED)': _opencv, 'PyTurboJPEG': _turbojpeg,
              'tensorflow (eager)': _tensorflow}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--images', type=int, default=400)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--long_side', type=int, default=500)
  args = parser.parse_args()
  from resnet_jax.data import decoding, image_ops  # pylint: disable=import-outside-toplevel
  from resnet_jax.datasets import sample_imagenet  # pylint: disable=import-outside-toplevel
  photos = [p if p.ndim == 3 else np.repeat(p[..., None], 3, -1)
            for p in sample_imagenet.photos()]
  rng = np.random.default_rng(0)
  small = [sample_imagenet.random_view(photos[i % len(photos)], rng, args.long_side)
           for i in range(args.images)]
  # The Inception crop's windows, drawn as the training pipeline draws them.
  window_rng = np.random.default_rng(1)
  windows = [image_ops.sample_inception_window(window_rng, decoding.Encoded(data).shape)
             for data in small]
  # case -> [(JPEG, DCT reduction, window or None)]
  cases = {f'{args.long_side}px, full scale': [(data, 1, None) for data in small],
           '2000px, 1/4 scale': [
               (sample_imagenet.random_view(photos[i % len(photos)], rng, 2000), 4, None)
               for i in range(max(1, args.images // 8))],
           f'{args.long_side}px, an Inception window': [
               (data, 1, window) for data, window in zip(small, windows)]}
  usable = {}
  for name, fn in CANDIDATES.items():
    try:
      fn(small[0], 1)
      usable[name] = fn
    except Exception as e:  # pylint: disable=broad-except  (not installed, no shared library)
      print(f'{name}: not usable here ({type(e).__name__}: {str(e)[:80]})')
  for case, images in cases.items():
    times = {name: [] for name in usable}
    for round_ in range(args.repeats):
      order = list(usable) if round_ % 2 == 0 else list(reversed(usable))
      for name in order:
        start = time.perf_counter()
        for data, reduce, window in images:
          usable[name](data, reduce, window)
        times[name].append(time.perf_counter() - start)
    base = len(images) / statistics.median(times['pillow (draft)'])
    print(f'{case} ({len(images)} JPEGs, one thread, median of {args.repeats} alternating '
          'rounds):')
    for name in usable:
      rate = len(images) / statistics.median(times[name])
      print(f'  {name:26s} {rate:8.1f} img/s  {rate / base:5.2f}x pillow')


if __name__ == '__main__':
  main()
