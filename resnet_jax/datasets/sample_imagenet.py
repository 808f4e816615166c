"""A small ILSVRC-2012 `manual_dir` made of real photos, for the real `imagenet2012` builder.

Tests and benchmarks need the genuine tfds ImageNet path (tars -> builder ->
TFRecords of JPEGs -> our pipeline) without the 150 GB download. This writes
`ILSVRC2012_img_train.tar` (one `<synset>.tar` per class) and
`ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_%08d.JPEG`) from photos that
ship inside the scikit-learn and scikit-image wheels: each class is one photo,
and every JPEG is a different random crop, scale and flip of it.

The builder labels validation images by position (sorted names zipped with
its `validation_labels.txt`), so the K validation images are exactly the first
K names and image i shows the photo of synset `validation_labels[i - 1]`.

    python -m resnet_jax.datasets.sample_imagenet MANUAL_DIR [--train_per_class 4] [--val 8]
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile

import numpy as np


PHOTO_NAMES = ('china', 'flower', 'astronaut', 'chelsea', 'coffee', 'rocket',
               'hubble_deep_field', 'retina', 'immunohistochemistry', 'camera')


def photos(path: str = '') -> list[np.ndarray]:
  """Real RGB (and one grey) photos bundled with scikit-learn and scikit-image, or read from
  a file that `save_photos` wrote (hosts without those packages)."""
  if path:
    with np.load(path) as saved:
      return [saved[name] for name in PHOTO_NAMES]
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  images = list(load_sample_images().images)  # china, flower: 427x640x3
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('sample_imagenet needs scikit-image: pip install -e ".[test]"') from e
  for name in PHOTO_NAMES[2:]:
    images.append(np.asarray(getattr(data, name)()))
  return images


def save_photos(path: str) -> None:
  """The photos in one compressed .npz, for `photos(path)`."""
  np.savez_compressed(path, **dict(zip(PHOTO_NAMES, photos())))


def validation_labels() -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
  return path.read_text().split()


def random_view(photo: np.ndarray, rng: np.random.Generator, long_side: int) -> bytes:
  """A JPEG of a random crop (40-100% of each side), resized to `long_side`, maybe mirrored."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = photo.shape[:2]
  ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
  top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  image = Image.fromarray(photo[top:top + ch, left:left + cw])
  scale = long_side / max(ch, cw)
  image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
  if rng.random() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_manual_dir(manual_dir: str, train_per_class: int = 4, num_val: int = 8,
                     long_side: int = 500, seed: int = 0, truncated: tuple[str, ...] = ()
                     ) -> list[str]:
  """Writes the two tars; returns the synsets used (those of the first `num_val` val labels).

  `truncated`: names of train JPEGs (e.g. 'n01751748_2.JPEG') to cut to half
  their length, as a broken download leaves them (tests of bad input).
  """
  rng = np.random.default_rng(seed)
  labels = validation_labels()[:num_val]
  synsets = list(dict.fromkeys(labels))
  pictures = photos()
  photo_of = {s: pictures[i % len(pictures)] for i, s in enumerate(synsets)}
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as train:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for j in range(train_per_class):
          name, payload = f'{synset}_{j}.JPEG', random_view(photo_of[synset], rng, long_side)
          _add(class_tar, name, payload[:len(payload) // 2] if name in truncated else payload)
      _add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i, synset in enumerate(labels, start=1):
      _add(val, f'ILSVRC2012_val_{i:08d}.JPEG', random_view(photo_of[synset], rng, long_side))
  return synsets


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('manual_dir')
  parser.add_argument('--train_per_class', type=int, default=4)
  parser.add_argument('--val', type=int, default=8)
  parser.add_argument('--long_side', type=int, default=500)
  args = parser.parse_args()
  synsets = write_manual_dir(args.manual_dir, args.train_per_class, args.val, args.long_side)
  print(f'{len(synsets)} classes, {len(synsets) * args.train_per_class} train and {args.val} '
        f'validation JPEGs in {args.manual_dir}')


if __name__ == '__main__':
  main()
