"""`sample_photos`: JPEGs of real photos as a tfds data set, prepared without TensorFlow.

For tests, benchmarks and accelerator hosts that have no TensorFlow (the
imagenet2012 builder re-encodes images with it): each class is one photo that
ships inside scikit-learn or scikit-image, each example a different random
crop, scale and flip of it (`sample_imagenet.random_view`), stored as the
JPEG bytes themselves, as imagenet2012 stores them. Importing this module
registers the builder; `prepare` writes it:

    python -m resnet_jax.datasets.sample_photos DATA_DIR [--train 10000] [--test 500]
"""
from __future__ import annotations

import argparse
import io
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from resnet_jax.datasets import sample_imagenet


class SamplePhotos(tfds.core.GeneratorBasedBuilder,
                   skip_registration=__name__ == '__main__'):  # `python -m`: see the end
  """Random views of real photos, one class per photo; sizes set by `prepare`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'JPEG views of the photos in scikit-learn and scikit-image.'}
  NUM_TRAIN, NUM_TEST, LONG_SIDE, TRUNCATED, PHOTOS = 64, 16, 500, (), ''

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Random JPEG views of photos bundled with scikit-learn and scikit-image.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=len(sample_imagenet.PHOTO_NAMES)),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(self.NUM_TRAIN, 0),
            'test': self._generate_examples(self.NUM_TEST, 1)}

  def _generate_examples(self, count: int, seed: int):
    photos = sample_imagenet.photos(self.PHOTOS)
    rng = np.random.default_rng(seed)
    for i in range(count):
      label = i % len(photos)
      photo = photos[label]
      if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
      payload = sample_imagenet.random_view(photo, rng, self.LONG_SIDE)
      if seed == 0 and i in self.TRUNCATED:
        payload = payload[:len(payload) // 2]
      yield i, {'image': io.BytesIO(payload), 'label': label}


def prepare(data_dir: str, num_train: int = 64, num_test: int = 16, long_side: int = 500,
            truncated: Sequence[int] = (), photos: str = '') -> tfds.core.DatasetBuilder:
  """Writes the data set (as ArrayRecord) in `data_dir`; `truncated`: train examples whose
  JPEG is cut in half (a corrupt file); `photos`: a file of `sample_imagenet.save_photos`
  (default: the photos of scikit-learn and scikit-image)."""
  builder_class = type('SamplePhotos', (SamplePhotos,), dict(
      NUM_TRAIN=num_train, NUM_TEST=num_test, LONG_SIDE=long_side, TRUNCATED=tuple(truncated), PHOTOS=photos,
      __module__=__name__), skip_registration=True)
  builder = builder_class(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return builder


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('data_dir')
  parser.add_argument('--train', type=int, default=10_000)
  parser.add_argument('--test', type=int, default=500)
  parser.add_argument('--long_side', type=int, default=500)
  parser.add_argument('--photos', default='', help='a .npz of sample_imagenet.save_photos')
  args = parser.parse_args()
  builder = prepare(args.data_dir, args.train, args.test, args.long_side, photos=args.photos)
  print(f'sample_photos: {args.train} train and {args.test} test JPEGs in {builder.data_dir}')


if __name__ == '__main__':  # run as the package's module, so tfds finds its files
  from resnet_jax.datasets import sample_photos as _module  # pylint: disable=import-self
  _module.main()
