"""resnet_jax/data builders, convert, sources and normalization: formats, splits, statistics."""
import json
import os
import re
import shutil
import struct
from unittest import mock

import numpy as np
import pytest

from resnet_jax import errors
from resnet_jax.data import builders
from resnet_jax.data import convert
from resnet_jax.data import image_ops
from resnet_jax.data import normalization
from resnet_jax.data import sources
from tests.support import helpers


def test_data_sets_are_prepared_as_array_record(digits_dir):
  builder = builders.get_builder(helpers.small_config(**{'data.data_dir': digits_dir}).data)
  assert builder.info.file_format.value == 'array_record'
  assert any(name.endswith('.array_record-00000-of-00001') for name in os.listdir(builder.data_dir))
  source = sources.open_source(builder, 'train[10:20]')
  assert len(source) == 10
  image, label = source.read(0)
  assert isinstance(image, bytes) and image.startswith(b'\x89PNG') and 0 <= label < 10
  assert source.key(0) == 'sklearn_digits-train.array_record-00000-of-00001__10'


def _masked_crc(data: bytes) -> bytes:
  import google_crc32c  # pylint: disable=import-outside-toplevel
  crc = google_crc32c.value(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _as_tfrecord(folder):
  """Rewrites a prepared ArrayRecord data set as tfds writes TFRecord (records with CRCs)."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  for name in os.listdir(folder):
    if '.array_record-' not in name:
      continue
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, name))
    records = reader.read_all()
    reader.close()
    with open(os.path.join(folder, name.replace('.array_record-', '.tfrecord-')), 'wb') as f:
      for record in records:
        length = struct.pack('<Q', len(record))
        f.write(length + _masked_crc(length) + record + _masked_crc(record))
    os.remove(os.path.join(folder, name))
  info = json.load(open(os.path.join(folder, 'dataset_info.json')))
  info['fileFormat'] = 'tfrecord'
  json.dump(info, open(os.path.join(folder, 'dataset_info.json'), 'w'))


def test_a_tfrecord_data_set_says_how_to_convert_and_converts_in_place(digits_dir, tmp_path):
  shutil.copytree(os.path.join(digits_dir, 'sklearn_digits'), tmp_path / 'sklearn_digits')
  config = helpers.small_config(**{'data.data_dir': str(tmp_path)})
  before = sources.open_source(builders.get_builder(config.data), 'test')
  expected = [before.read(i) for i in range(len(before))]
  folder = builders.get_builder(config.data).data_dir
  _as_tfrecord(folder)
  with pytest.raises(errors.DataError, match=re.escape(
      f'holds sklearn_digits as tfrecord files; resnet_jax reads array_record (random access, '
      f'no TensorFlow). Convert it once, in place (the tfrecord files stay): python run.py '
      f'--mode=convert --config.data.name=sklearn_digits --config.data.data_dir={tmp_path}')):
    builders.get_builder(config.data)
  out = helpers.run_py('--mode=convert', f'--config.data.data_dir={tmp_path}').stdout
  assert '1797 records converted to ArrayRecord' in out
  assert any('.tfrecord-' in name for name in os.listdir(folder))  # nothing deleted
  after = sources.open_source(builders.get_builder(config.data), 'test')
  assert [after.read(i) for i in range(len(after))] == expected


def test_a_truncated_tfrecord_file_is_named(tmp_path):
  path = tmp_path / 'x-train.tfrecord-00000-of-00001'
  record = b'abc'
  length = struct.pack('<Q', len(record))
  path.write_bytes(length + _masked_crc(length) + record)  # no data CRC: cut short
  with pytest.raises(errors.DataError, match=f'{re.escape(str(path))} ends inside a record'):
    list(convert.tfrecords(convert.epath.Path(path)))


def test_a_missing_split_and_an_unknown_data_set_are_config_errors(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.eval_split': 'validation'})
  builder = builders.get_builder(config.data)
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.data.eval_split='validation': sklearn_digits has no split 'validation'. "
      'Available splits: test, train.')):
    builders.get_splits(builder, config.data)
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'data.name': 'no_such_data'})
  with pytest.raises(errors.ConfigError, match="Unknown data set 'no_such_data'"):
    builders.get_builder(config.data)


def test_per_pixel_mean_is_computed_once_and_cached(digits_dir):
  config = helpers.small_config(**{'data.data_dir': digits_dir})
  builder = builders.get_builder(config.data)
  mean = normalization.per_pixel_mean(builder, 'train', 32)
  assert mean.shape == (32, 32, 3) and 0 < mean.mean() < 0.5
  with mock.patch.object(sources.Source, 'read', side_effect=AssertionError('recomputed')):
    np.testing.assert_array_equal(normalization.per_pixel_mean(builder, 'train', 32), mean)


def test_per_pixel_mean_of_a_big_split_comes_from_its_first_examples(digits_dir, monkeypatch):
  """Big splits (ImageNet) average a random sample: tfds stores examples in hashed order."""
  monkeypatch.setattr(normalization, 'MEAN_EXAMPLES', 100)
  config = helpers.small_config(**{'data.data_dir': digits_dir})
  builder = builders.get_builder(config.data)
  mean = normalization.per_pixel_mean(builder, 'train[37:]', 32)
  source = sources.open_source(builder, 'train[37:]')
  first = np.stack([image_ops.resize(source.read(i)[0], 32) for i in range(100)])
  np.testing.assert_allclose(mean, first.astype(np.float64).mean(0) / 255, atol=1e-6)
  monkeypatch.setattr(normalization, 'MEAN_EXAMPLES', 10_000)  # the whole split: another file
  assert np.abs(normalization.per_pixel_mean(builder, 'train[37:]', 32) - mean).max() > 1e-4
  assert not [f for f in os.listdir(builder.data_dir) if '.tmp-' in f]  # written, then renamed
