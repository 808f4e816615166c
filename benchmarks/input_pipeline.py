"""ImageNet input pipelines against the standard tf.data recipe, side by side, per core and on all.

    python benchmarks/input_pipeline.py [--train_images 5000] [--batches 200] [--repeats 2]

Builds (once, in --data_dir) an ILSVRC-2012 manual_dir of about 500x375 JPEGs
made from real photos (resnet_jax.datasets.sample_imagenet), prepares it with
the real tfds `imagenet2012` builder, then times, each in a fresh process,
pinned to one core (taskset) and on all cores, in alternating order:
- `reference train`: the standard tf.data ImageNet recipe, written here:
  `repeat()` + shuffle, Inception crop with fused `decode_and_crop_jpeg`,
  bicubic resize without antialiasing, random flip, float32 normalised output;
- `reference eval`: its evaluation: fused decode of the centre crop
  (224/256 of the shorter side), bicubic resize, float32 normalised output;
- resnet_jax's pipelines as the trainer builds them (uint8 batches; the
  normalisation and flips run on the devices): train with the paper's scale
  augmentation and with Inception crops, eval with a centre crop and 10-crop.
Each case is timed in steady state: after --warmup batches, --batches batches
(the defaults pass several shuffle-buffer loads). Ratios are to the reference
of the same kind (train or eval), in the same setting.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CASES = [('train', 'reference'), ('train', 'scale'), ('train', 'inception'),
         ('eval', 'reference'), ('eval', 'center'), ('eval', 'ten_crop')]
SHUFFLE_BUFFER = 1024
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def config_for(data_dir: str, kind: str, variant: str, batch: int):
  from configs import imagenet  # pylint: disable=import-outside-toplevel
  config = imagenet.get_config('resnet50')
  config.data.data_dir = data_dir
  config.batch_size = config.eval_batch_size = batch
  config.data.shuffle_buffer = SHUFFLE_BUFFER
  if kind == 'train' and variant != 'reference':
    config.data.train_augment = variant
  elif kind == 'eval' and variant != 'reference':
    config.data.eval_crop = variant
  return config


def reference_dataset(builder, kind: str, batch: int):
  """The standard tf.data ImageNet recipe (as in the TF model garden and big_vision)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  mean, std = tf.constant(MEAN) * 255, tf.constant(STD) * 255

  def train(example):
    encoded = example['image']
    shape = tf.io.extract_jpeg_shape(encoded)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros((0, 0, 4)), min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(size)
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, (224, 224), method='bicubic')
    image = tf.image.random_flip_left_right(image)
    return {'image': (image - mean) / std, 'label': example['label']}

  def evaluate(example):
    encoded = example['image']
    shape = tf.io.extract_jpeg_shape(encoded)
    side = tf.cast(224 / 256 * tf.cast(tf.reduce_min(shape[:2]), tf.float32), tf.int32)
    top, left = (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([top, left, side, side]), channels=3)
    image = tf.image.resize(image, (224, 224), method='bicubic')
    return {'image': (image - mean) / std, 'label': example['label']}

  decoders = {'image': tfds.decode.SkipDecoding()}
  if kind == 'train':
    ds = builder.as_dataset(split='train', shuffle_files=True, decoders=decoders)
    ds = ds.repeat().shuffle(SHUFFLE_BUFFER).map(train, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = builder.as_dataset(split='validation', decoders=decoders).repeat()
    ds = ds.map(evaluate, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def measure(data_dir: str, kind: str, variant: str, batch: int, warmup: int,
            batches: int) -> dict:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from resnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  config = config_for(data_dir, kind, variant, batch)
  inp = input_pipeline.create_input(config, [0], 1)
  if variant == 'reference':
    iterator = iter(tfds.as_numpy(reference_dataset(inp.builder, kind, batch)))
  elif kind == 'train':
    iterator = input_pipeline.train_iterator(config, inp)
  else:
    iterator = iter(tfds.as_numpy(input_pipeline.eval_dataset(config, inp).repeat()))
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch_data = next(iterator)
  seconds = time.perf_counter() - start
  images = batch_data['image']
  return {'img_per_s': batch * batches / seconds, 'dtype': str(images.dtype),
          'shape': list(images.shape)}


def prepare(data_dir: str, train_images: int) -> tuple[int, int]:
  """The data set, built once: (train images, validation images)."""
  from resnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from resnet_jax.datasets import sample_imagenet  # pylint: disable=import-outside-toplevel
  config = config_for(data_dir, 'train', 'scale', 32)
  builder = input_pipeline.get_builder(config.data, prepare=False)
  if not builder.is_prepared():
    manual = os.path.join(data_dir, 'manual')
    num_val = 500
    classes = len(dict.fromkeys(sample_imagenet.validation_labels()[:num_val]))
    sample_imagenet.write_manual_dir(manual, train_per_class=-(-train_images // classes),
                                     num_val=num_val, long_side=500)
    config.data.manual_dir = manual
    builder = input_pipeline.prepare(config.data)
    shutil.rmtree(manual)
  splits = builder.info.splits
  return splits['train'].num_examples, splits['validation'].num_examples


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default='/tmp/resnet_jax_pipeline_bench')
  parser.add_argument('--train_images', type=int, default=5000)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--warmup', type=int, default=40, help='batches before timing')
  parser.add_argument('--batches', type=int, default=200, help='timed batches')
  parser.add_argument('--repeats', type=int, default=2, help='alternating repeats per setting')
  parser.add_argument('--cases', default=','.join(f'{k}:{v}' for k, v in CASES))
  parser.add_argument('--one', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.data_dir, *args.one, args.batch, args.warmup, args.batches)))
    return
  cases = [tuple(case.split(':')) for case in args.cases.split(',')]
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  num_train, num_val = prepare(args.data_dir, args.train_images)
  cores = len(os.sched_getaffinity(0))
  print(f'{num_train} train / {num_val} validation JPEGs of about 500x375 (real photos); batch '
        f'{args.batch}, 224x224 out; shuffle buffer {SHUFFLE_BUFFER}; {args.warmup} warm-up '
        f'then {args.batches} timed batches; median of {args.repeats} alternating runs', flush=True)
  settings = [('1 core', ['taskset', '-c', str(min(os.sched_getaffinity(0)))]),
              (f'{cores} cores', [])]
  results = {}
  for repeat in range(args.repeats):
    for name, pin in settings:
      for kind, variant in cases if repeat % 2 == 0 else cases[::-1]:
        cmd = pin + [sys.executable, os.path.abspath(__file__), f'--data_dir={args.data_dir}',
                     f'--batch={args.batch}', f'--warmup={args.warmup}',
                     f'--batches={args.batches}', '--one', kind, variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
          raise SystemExit(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.setdefault((kind, variant, name), []).append(result['img_per_s'])
        results[(kind, variant, 'output')] = f'{result["dtype"]} {result["shape"]}'
  header = f'{"pipeline":34}'
  for name, _ in settings:
    header += f' {"img/s, " + name:>14} {"ratio":>6}'
  print(header + f' {"scaling":>8}  output')
  for kind, variant in cases:
    row = f'{kind + " " + variant:34}'
    rates = []
    for name, _ in settings:
      rate = statistics.median(results[(kind, variant, name)])
      reference = results.get((kind, 'reference', name))
      ratio = rate / statistics.median(reference) if reference else float('nan')
      row += f' {rate:14.1f} {ratio:5.2f}x'
      rates.append(rate)
    print(row + f' {rates[-1] / rates[0]:7.2f}x  {results[(kind, variant, "output")]}', flush=True)


if __name__ == '__main__':
  main()
