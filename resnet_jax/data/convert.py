"""A tfds data set prepared as TFRecord (tfds' default) -> ArrayRecord, in place, no TensorFlow.

Both formats hold the same serialized examples, one per record, so the
conversion copies each shard's records in order into an ArrayRecord file of
the name tfds gives it and then marks the data set's `dataset_info.json` as
ArrayRecord (written whole, then renamed). The TFRecord files stay, so
nothing is lost if it stops halfway; running it again starts over.
(`tfds convert_format` does the same but needs Apache Beam.)
"""
from __future__ import annotations

import json
import struct
from typing import Iterator

from absl import logging
from etils import epath

from resnet_jax import errors

INFO = 'dataset_info.json'


def tfrecords(path: epath.Path) -> Iterator[bytes]:
  """The records of a TFRecord file: length (8 bytes), its CRC (4), data, data CRC (4)."""
  with path.open('rb') as f:
    while header := f.read(12):
      if len(header) < 12:
        raise errors.DataError(f'{path} ends inside a record header: the file is truncated.')
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        raise errors.DataError(f'{path} ends inside a record: the file is truncated.')
      yield data


def convert(dataset_dir: str | epath.Path) -> int:
  """Converts the TFRecord shards of a prepared data set version folder (the one holding
  dataset_info.json); returns the number of records written."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  folder = epath.Path(dataset_dir)
  info_path = folder / INFO
  if not info_path.exists():
    raise errors.DataError(f'{folder} has no {INFO}: give the folder of a prepared data set '
                           'version (e.g. DATA_DIR/imagenet2012/5.1.0).')
  info = json.loads(info_path.read_text())
  if info.get('fileFormat', 'tfrecord') != 'tfrecord':
    raise errors.DataError(f'{folder} is already {info["fileFormat"]}.')
  shards = sorted(p for p in folder.iterdir() if '.tfrecord-' in p.name)
  if not shards:
    raise errors.DataError(f'{folder}: no TFRecord shards (*.tfrecord-*) to convert.')
  total = 0
  for shard in shards:
    target = shard.with_name(shard.name.replace('.tfrecord-', '.array_record-'))
    writer = array_record_module.ArrayRecordWriter(str(target), 'group_size:1')
    count = 0
    for record in tfrecords(shard):
      writer.write(record)
      count += 1
    writer.close()
    logging.info('%s: %d records -> %s', shard.name, count, target.name)
    total += count
  info['fileFormat'] = 'array_record'
  temporary = folder / f'{INFO}.tmp'
  temporary.write_text(json.dumps(info, indent=2))
  temporary.replace(info_path)
  return total
