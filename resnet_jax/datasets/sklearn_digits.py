"""`sklearn_digits`: scikit-learn's 1,797 real 8x8 handwritten digits as a tfds data set.

The images ship inside the scikit-learn wheel, so this data set needs no
download on any machine; exposing it as a tfds builder lets the zero-download
quickstart flow through exactly the same pipeline as CIFAR-10 and ImageNet.
Importing this module registers the builder with tfds. The images are
PNG-encoded here with Pillow, so preparing it needs no TensorFlow (tfds'
Image feature would encode arrays with TensorFlow).
"""
import io

import numpy as np
import tensorflow_datasets as tfds

# Every fifth image is a test image: a fixed, seed-free split of 1,437 / 360.
TEST_EVERY = 5


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """UCI ML hand-written digits (Alpaydin & Kaynak, 1998), as bundled with scikit-learn."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Train: 1,437 images; test: every fifth image (360).'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='8x8 grey handwritten digits from 43 writers, bundled with scikit-learn.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(test=False),
            'test': self._generate_examples(test=True)}

  def _generate_examples(self, test: bool):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    # Pixel values are counts 0..16 (of a 4x4 block of a 32x32 bitmap).
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    for i, (image, label) in enumerate(zip(images, digits.target)):
      if (i % TEST_EVERY == 0) == test:
        yield i, {'image': _png(image), 'label': int(label)}


def _png(image: np.ndarray) -> io.BytesIO:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format='PNG')
  buffer.seek(0)
  return buffer
