"""Random access to a split's records (tfds data sources), and errors that name the record.

Images stay encoded (`SkipDecoding`): the host decodes each one (simplejpeg or
Pillow) exactly as far as its crop needs (`image_ops.py`). A record or image that
cannot be read stops the run with its tfds key, the same name tfds gives it
(`<file>__<index in file>`), so the user can find and replace it.

A `gs://` data_dir is read in place: array_record's reader opens gs:// files
itself (through google-cloud-cpp and the host's default credentials), and tfds
reads the data set's metadata through etils `epath`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax import errors
from resnet_jax.data import builders


@dataclasses.dataclass(frozen=True)
class Source:
  """One split's records: `read(i)` gives (encoded image or uint8 array, label)."""
  name: str
  split: str
  source: Any  # tfds' ArrayRecordDataSource (picklable: grain's workers open their own)
  image_key: str
  label_key: str
  files: tuple[tuple[str, int, int], ...]  # (file, skip, take) of the split, in order

  def __len__(self) -> int:
    return len(self.source)

  def read(self, index: int) -> tuple[Any, int]:
    try:
      example = self.source[index]
    except Exception as e:  # pylint: disable=broad-except  (array_record, protobuf)
      raise errors.DataError(
          f'Record {self.key(index)} of {self.name} ({self.split}) cannot be read: '
          f'{_first_line(str(e))}. Rebuild the data set (python run.py --mode=prepare) '
          'from intact files.') from None
    return example[self.image_key], int(example[self.label_key])

  def transformed(self, index: int, transform: Callable[[Any], Any]) -> tuple[Any, int]:
    """(`transform` of record `index`'s image, its label); an image that cannot be decoded
    is a DataError that names the record."""
    image, label = self.read(index)
    try:
      return transform(image), label
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise errors.DataError(
          f'The image of record {self.key(index)} of {self.name} ({self.split}) is corrupt '
          'or truncated and cannot be decoded; nothing was trained on it. Rebuild the data set '
          f'from intact files, or remove that image and prepare {self.name} again. '
          f'(Pillow: {_first_line(str(e))})') from None

  def key(self, index: int) -> str:
    """tfds' name of the split's record `index`: <file>__<index in that file>."""
    for filename, skip, take in self.files:
      if index < take:
        return f'{os.path.basename(filename)}__{skip + index}'
      index -= take
    raise IndexError(index)


def open_source(builder: tfds.core.DatasetBuilder, split: str) -> Source:
  """The records of `split` (slices such as 'train[:5000]' allowed)."""
  image_key, label_key = builders.image_and_label_keys(builder)
  source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
  files = tuple((f.filename, f.skip, f.take)
                for f in builder.info.splits[split].file_instructions)
  return Source(builder.name, split, source, image_key, label_key, files)


def part_of_split(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of part `index` of `count` disjoint parts (sizes differ by at most one)."""
  return (num_examples * index // count, num_examples * (index + 1) // count)


def _first_line(message: str) -> str:
  return (message.strip().splitlines() or [''])[0][:300]
