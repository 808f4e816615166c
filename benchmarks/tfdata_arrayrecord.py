"""tf.data's window decoding over the ArrayRecord data set, against grain: Inception crops.

    python benchmarks/tfdata_arrayrecord.py [--train_images 2000] [--batches 60] [--repeats 3]
    python benchmarks/tfdata_arrayrecord.py --quick     # tiny: 32x32 out, a few batches

Issue 23 keeps tf.data where grain falls short, and grain's Inception row is
up to 7% behind the deleted tf.data pipeline, which read TFRecord files and
decoded only each crop's window (`decode_and_crop_jpeg`). tfds has no tf.data
reader for ArrayRecord (`as_dataset()` raises NotImplementedError for it), so
a tf.data loader over the data set that grain reads must be fed from Python.
This script's `tf.data over ArrayRecord` does that as cheaply as it can: a
generator yields whole batches of encoded images (read through the tfds data
source, as grain reads them) with each image's window (drawn as the training
pipeline draws it), and tf.data's parallel map decodes only the window and
resizes it (bilinear, no antialiasing, uint8 out, as grain's). Both run on
the `sample_photos` data set of benchmarks/input_pipeline.py (JPEGs of about
500x375), each case in a fresh process pinned to its cores, in alternating
order; the median of --repeats rounds is printed. Needs TensorFlow (the
`prepare` extra).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import input_pipeline  # noqa: E402  pylint: disable=wrong-import-position

# (row, loader, cores)
CASES = [('grain, 1 thread', 'grain_threads', 1), ('tf.data over ArrayRecord', 'tfdata', 1),
         ('grain, 2 threads', 'grain_threads', 2), ('grain, 2 workers', 'grain_workers', 2),
         ('tf.data over ArrayRecord', 'tfdata', 2)]
QUICK = dict(train_images=64, test_images=16, image_size=32, batch=8, warmup=2, batches=4)


def tfdata_batches(photos_dir: str, batch: int, image_size: int, cores: int, seed: int = 0):
  """uint8 Inception crops of the train split: records and windows from Python, one call
  per batch; decoding of each window and the resize in tf.data's parallel map."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from resnet_jax.data import builders, decoding, image_ops, sources  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_inter_op_parallelism_threads(cores)
  tf.config.threading.set_intra_op_parallelism_threads(cores)
  config = input_pipeline.config_for(photos_dir, 'train', 'inception', batch, image_size)
  source = sources.open_source(builders.get_builder(config.data), 'train')

  def generate():
    for epoch in itertools.count():
      order = np.random.default_rng((seed, epoch)).permutation(len(source))
      for start in range(0, len(order) - batch + 1, batch):
        images, windows, labels = [], [], []
        for index in order[start:start + batch]:
          image, label = source.read(int(index))
          rng = np.random.default_rng((seed, epoch, int(index)))
          windows.append(image_ops.sample_inception_window(rng, decoding.Encoded(image).shape))
          images.append(image)
          labels.append(label)
        yield np.array(images, object), np.array(windows, np.int32), np.array(labels, np.int64)

  def crop(image, window, label):
    pixels = tf.io.decode_and_crop_jpeg(image, window, channels=3)
    resized = tf.image.resize(pixels, (image_size, image_size), method='bilinear')
    return {'image': tf.saturate_cast(resized + 0.5, tf.uint8), 'label': label}

  ds = tf.data.Dataset.from_generator(generate, output_signature=(
      tf.TensorSpec((None,), tf.string), tf.TensorSpec((None, 4), tf.int32),
      tf.TensorSpec((None,), tf.int64)))
  ds = ds.unbatch().map(crop, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def measure(photos_dir: str, loader: str, cores: int, batch: int, image_size: int, warmup: int,
            batches: int) -> dict:
  """One case in this process: images per second over `batches` batches after `warmup`."""
  if loader != 'tfdata':
    workers, threads = (cores, 1) if loader == 'grain_workers' else (0, cores)
    return input_pipeline.measure(photos_dir, 'train', 'inception', workers, batch, image_size,
                                  warmup, batches, threads=threads)
  return input_pipeline.timed(tfdata_batches(photos_dir, batch, image_size, cores), batch,
                              warmup, batches)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default='/tmp/resnet_jax_pipeline_bench')
  parser.add_argument('--train_images', type=int, default=2000)
  parser.add_argument('--image_size', type=int, default=224, help='crop size out')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--warmup', type=int, default=10, help='batches before timing')
  parser.add_argument('--batches', type=int, default=60, help='timed batches')
  parser.add_argument('--repeats', type=int, default=3, help='alternating rounds')
  parser.add_argument('--quick', action='store_true', help='tiny sizes (a smoke test)')
  parser.add_argument('--one', nargs=2, help=argparse.SUPPRESS)  # loader cores
  if parser.parse_known_args()[0].quick:
    parser.set_defaults(**{k: v for k, v in QUICK.items() if k != 'test_images'})
  args = parser.parse_args()
  if not input_pipeline.tensorflow_importable():
    raise SystemExit("This benchmark needs TensorFlow for its tf.data rows: pip install -e "
                     "'.[prepare]' in resnet_jax's checkout.")
  if args.one:
    print(json.dumps(measure(args.data_dir, args.one[0], int(args.one[1]), args.batch,
                             args.image_size, args.warmup, args.batches)))
    return
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  photos_dir, num_train, _ = input_pipeline.prepare(
      args.data_dir, args.train_images, QUICK['test_images'] if args.quick else 500)
  print(f'sample_photos: {num_train} train JPEGs of real photos in {photos_dir}; Inception '
        f'crops, batch {args.batch}, {args.image_size}x{args.image_size} uint8 out; '
        f'{args.warmup} warm-up then {args.batches} timed batches; median of {args.repeats} '
        'alternating rounds, each case in a fresh process', flush=True)
  rates: dict[int, list[float]] = {i: [] for i in range(len(CASES))}
  for repeat in range(args.repeats):
    order = list(range(len(CASES)))
    for i in order if repeat % 2 == 0 else order[::-1]:
      _, loader, cores = CASES[i]
      pin, _ = input_pipeline.pinning(cores)
      cmd = pin + [sys.executable, os.path.abspath(__file__), f'--data_dir={photos_dir}',
                   f'--batch={args.batch}', f'--image_size={args.image_size}',
                   f'--warmup={args.warmup}', f'--batches={args.batches}',
                   '--one', loader, str(cores)]
      rates[i].append(input_pipeline.run_case(cmd)['img_per_s'])
  print(f'{"cores":5} {"loader":26} {"img/s":>9}  / best grain  rounds')
  for cores in sorted({case[2] for case in CASES}):
    rows = [i for i, case in enumerate(CASES) if case[2] == cores]
    best = max(statistics.median(rates[i]) for i in rows if CASES[i][1] != 'tfdata')
    for i in rows:
      rate = statistics.median(rates[i])
      print(f'{cores:<5} {CASES[i][0]:26} {rate:9.1f}  {rate / best:10.2f}x  '
            + ' '.join(f'{r:.0f}' for r in rates[i]), flush=True)


if __name__ == '__main__':
  main()
