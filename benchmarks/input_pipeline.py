"""The grain input pipeline on JPEGs of real photos: per core, with 1 and 2 worker processes,
against the standard tf.data recipe where TensorFlow is installed.

    python benchmarks/input_pipeline.py [--train_images 5000] [--batches 200] [--repeats 2]
    python benchmarks/input_pipeline.py --quick        # tiny: 32x32 out, a few batches

Builds (once, under --data_dir) a `sample_photos` data set of JPEGs with a
long side of 500 (about 500x375) made from real photos, without TensorFlow
(resnet_jax.datasets.sample_photos), then times, each in a fresh process, in
alternating order (the case order reverses every round):
- resnet_jax's pipelines as the trainer builds them (resnet_jax/data, read
  with grain; uint8 batches: the normalisation and flips run on the devices):
  train with the paper's scale augmentation and with Inception crops, eval
  with a centre crop and 10-crop;
- where TensorFlow is importable, the `tf.data reference`, the standard
  tf.data ImageNet recipe written here (as in the TF model garden and
  big_vision), reading the same JPEGs from TFRecord files this script writes
  once: train: file interleave, `repeat()` + shuffle, Inception crop with
  fused `decode_and_crop_jpeg`, bicubic resize without antialiasing, random
  flip; eval: fused decode of the centre crop (image_size/eval_resize of the
  shorter side) and bicubic resize; both float32 normalised output.
Settings: `1 core` (grain workers=0, threads=1: the pipeline in the main
process), `1 worker` and `2 workers` (grain worker processes, one thread
each), each pinned with taskset to as many cores as it has workers (at least
one); the tf.data reference runs pinned to the same cores. Each case is timed
in steady state: after --warmup batches, --batches batches. `grain/tf.data` is
grain's rate over the tf.data reference of the same kind (train or eval) in
the same setting; `1->2 workers` is the 2-worker rate over the 1-worker rate.
"""
from __future__ import annotations

import argparse
import importlib.util
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
# (name, grain worker processes, cores it is pinned to)
SETTINGS = [('1 core', 0, 1), ('1 worker', 1, 1), ('2 workers', 2, 2)]
LONG_SIDE = 500
SHUFFLE_BUFFER = 1024  # the tf.data reference's
TRAIN_SHARDS = 8       # the tf.data reference's TFRecord files of the train split
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
QUICK = dict(train_images=64, test_images=16, image_size=32, batch=8, warmup=2, batches=4)


def config_for(data_dir: str, kind: str, variant: str, batch: int, image_size: int = 224,
               name: str = 'sample_photos', eval_split: str = 'test'):
  """configs/imagenet.py on data set `name` in `data_dir`, its sizes scaled to `image_size`
  (224: the paper's 256 resize for eval and scale range [256, 480])."""
  from configs import imagenet  # pylint: disable=import-outside-toplevel
  config = imagenet.get_config('resnet50')
  config.data.name = name
  config.data.data_dir = data_dir
  config.data.eval_split = eval_split
  config.data.image_size = image_size
  config.data.eval_resize = round(image_size * 256 / 224)
  config.data.scale_range = (config.data.eval_resize, round(image_size * 480 / 224))
  config.batch_size = config.eval_batch_size = batch
  if kind == 'train' and variant != 'reference':
    config.data.train_augment = variant
  elif kind == 'eval' and variant != 'reference':
    config.data.eval_crop = variant
  return config


def prepare(data_dir: str, train_images: int, test_images: int = 500) -> tuple[str, int, int]:
  """The sample_photos data set, built once under `data_dir` (one folder per size):
  (its tfds data_dir, train images, test images)."""
  from resnet_jax.data import builders  # pylint: disable=import-outside-toplevel
  from resnet_jax.datasets import sample_photos  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  photos_dir = os.path.join(data_dir, f'sample_photos_{train_images}_{test_images}_{LONG_SIDE}')
  config = config_for(photos_dir, 'train', 'scale', 1)
  if not builders.get_builder(config.data, prepare=False).is_prepared():
    sample_photos.prepare(photos_dir, train_images, test_images, LONG_SIDE)
  splits = builders.get_builder(config.data).info.splits
  return photos_dir, splits['train'].num_examples, splits['test'].num_examples


def mean_shape(photos_dir: str, count: int = 64) -> tuple[int, int]:
  """Mean (width, height) of the first `count` train JPEGs."""
  from resnet_jax.data import builders, image_ops, sources  # pylint: disable=import-outside-toplevel
  source = sources.open_source(builders.get_builder(config_for(photos_dir, 'train', 'scale',
                                                               1).data), 'train')
  sizes = [image_ops.Encoded(source.read(i)[0]).shape[::-1]
           for i in range(min(count, len(source)))]
  return tuple(round(statistics.mean(s[k] for s in sizes)) for k in (0, 1))


def reference_files(builder, split: str, shards: int) -> list[str]:
  """The split's JPEGs and labels as TFRecord files of tf.train.Examples, written once."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from resnet_jax.data import sources  # pylint: disable=import-outside-toplevel
  folder = os.path.join(builder.data_dir, 'tf_data_reference')
  files = [os.path.join(folder, f'{split}.tfrecord-{i:05d}-of-{shards:05d}') for i in range(shards)]
  if all(os.path.exists(f) for f in files):
    return files
  os.makedirs(folder, exist_ok=True)
  source = sources.open_source(builder, split)
  for shard, path in enumerate(files):
    with tf.io.TFRecordWriter(path + '.tmp') as writer:
      for index in range(shard, len(source), shards):
        image, label = source.read(index)
        writer.write(tf.train.Example(features=tf.train.Features(feature={
            'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
            'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        })).SerializeToString())
    os.replace(path + '.tmp', path)
  return files


def reference_dataset(builder, kind: str, batch: int, size: int, resize: int):
  """The standard tf.data ImageNet recipe (as in the TF model garden and big_vision)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  mean, std = tf.constant(MEAN) * 255, tf.constant(STD) * 255
  features = {'image': tf.io.FixedLenFeature([], tf.string),
              'label': tf.io.FixedLenFeature([], tf.int64)}

  def train(record):
    example = tf.io.parse_single_example(record, features)
    encoded = example['image']
    shape = tf.io.extract_jpeg_shape(encoded)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros((0, 0, 4)), min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop)
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, (size, size), method='bicubic')
    image = tf.image.random_flip_left_right(image)
    return {'image': (image - mean) / std, 'label': example['label']}

  def evaluate(record):
    example = tf.io.parse_single_example(record, features)
    encoded = example['image']
    shape = tf.io.extract_jpeg_shape(encoded)
    side = tf.cast(size / resize * tf.cast(tf.reduce_min(shape[:2]), tf.float32), tf.int32)
    top, left = (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([top, left, side, side]), channels=3)
    image = tf.image.resize(image, (size, size), method='bicubic')
    return {'image': (image - mean) / std, 'label': example['label']}

  if kind == 'train':
    files = reference_files(builder, 'train', TRAIN_SHARDS)
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files)).repeat()
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.shuffle(SHUFFLE_BUFFER).map(train, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = tf.data.TFRecordDataset(reference_files(builder, 'test', 1)).repeat()
    ds = ds.map(evaluate, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def measure(photos_dir: str, kind: str, variant: str, workers: int, batch: int, image_size: int,
            warmup: int, batches: int, threads: int = 1, **data_set) -> dict:
  """One case in this process: images per second over `batches` batches after `warmup`
  (`data_set`: config_for's name and eval_split, if not sample_photos)."""
  # pylint: disable-next=import-outside-toplevel
  from resnet_jax.data import eval_stream, inputs, loading, train_stream
  config = config_for(photos_dir, kind, variant, batch, image_size, **data_set)
  config.data.workers, config.data.threads = workers, threads
  inp = inputs.create_input(config.data, batch_size=batch, eval_batch_size=batch,
                            host_rows=(0, batch))
  if variant == 'reference':
    data = config.data
    iterator = iter(reference_dataset(inp.builder, kind, batch, data.image_size,
                                      data.eval_resize).as_numpy_iterator())
  elif kind == 'train':
    iterator = train_stream.train_iterator(config.data, inp, seed=config.seed)
  else:  # every test image (the last batch padded, masked), over and over
    iterator = iter(loading.loader(eval_stream.eval_dataset(config.data, inp).repeat(),
                                   config.data))
  return timed(iterator, batch, warmup, batches)


def timed(iterator, batch: int, warmup: int, batches: int) -> dict:
  """Images per second of `iterator` (dicts of 'image' and, for padded batches, 'mask') over
  `batches` batches after `warmup`, and the dtype and shape of its images."""
  for _ in range(warmup):
    next(iterator)
  images = 0
  start = time.perf_counter()
  for _ in range(batches):
    batch_data = next(iterator)
    images += int(batch_data['mask'].sum()) if 'mask' in batch_data else batch
  seconds = time.perf_counter() - start
  out = batch_data['image']
  return {'img_per_s': images / seconds, 'output': f'{out.dtype} {list(out.shape)}'}


def run_case(cmd: list[str], cwd: str | None = None) -> dict:
  """The JSON a `--one` run of a benchmark prints last; its stderr if it fails."""
  out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def tensorflow_importable() -> bool:
  try:
    return importlib.util.find_spec('tensorflow') is not None
  except (ImportError, ValueError):
    return False


def pinning(cores: int) -> tuple[list[str], str]:
  """The taskset prefix that pins a process to `cores` of this process's cores, and a note."""
  mine = sorted(os.sched_getaffinity(0))
  if not shutil.which('taskset'):
    return [], 'not pinned (no taskset)'
  if len(mine) < cores:
    return [], f'not pinned (only {len(mine)} core(s) here)'
  return ['taskset', '-c', ','.join(map(str, mine[:cores]))], f'{cores} core(s)'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default='/tmp/resnet_jax_pipeline_bench')
  parser.add_argument('--train_images', type=int, default=5000)
  parser.add_argument('--test_images', type=int, default=500)
  parser.add_argument('--image_size', type=int, default=224, help='crop size out')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--warmup', type=int, default=40, help='batches before timing')
  parser.add_argument('--batches', type=int, default=200, help='timed batches')
  parser.add_argument('--repeats', type=int, default=2, help='alternating rounds')
  parser.add_argument('--cases', default=','.join(f'{k}:{v}' for k, v in CASES))
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes (a smoke test): ' + ', '.join(
                          f'{k}={v}' for k, v in QUICK.items()))
  parser.add_argument('--one', nargs=3, help=argparse.SUPPRESS)  # kind variant workers
  if parser.parse_known_args()[0].quick:
    parser.set_defaults(**QUICK)
  args = parser.parse_args()
  if args.one:
    kind, variant, workers = args.one
    print(json.dumps(measure(args.data_dir, kind, variant, int(workers), args.batch,
                             args.image_size, args.warmup, args.batches)))
    return
  cases = [tuple(case.split(':')) for case in args.cases.split(',')]
  unknown = set(cases) - set(CASES)
  if unknown:
    parser.error(f'unknown --cases {sorted(unknown)}; choose from '
                 f'{",".join(f"{k}:{v}" for k, v in CASES)}')
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  with_tf = tensorflow_importable()
  if not with_tf and any(v == 'reference' for _, v in cases):
    cases = [case for case in cases if case[1] != 'reference']
    print('tf.data reference rows skipped: TensorFlow is not importable here.', flush=True)
  photos_dir, num_train, num_test = prepare(args.data_dir, args.train_images, args.test_images)
  width, height = mean_shape(photos_dir)
  settings = [(name, workers, *pinning(cores)) for name, workers, cores in SETTINGS]
  print(f'sample_photos: {num_train} train / {num_test} test JPEGs of real photos (mean '
        f'{width}x{height}) in {photos_dir}; batch {args.batch}, {args.image_size}x'
        f'{args.image_size} out; {args.warmup} warm-up then {args.batches} timed batches; '
        f'median of {args.repeats} alternating rounds, each case in a fresh process', flush=True)
  print('settings: ' + '; '.join(
      f'{name}: grain workers={workers}, threads=1, {note}' for name, workers, _, note in settings),
        flush=True)
  results, outputs = {}, {}
  for repeat in range(args.repeats):
    reference_rates = {}  # tf.data has no workers: one run per set of cores and round
    for name, workers, pin, _ in settings:
      for kind, variant in cases if repeat % 2 == 0 else cases[::-1]:
        if variant == 'reference' and (kind, tuple(pin)) in reference_rates:
          results.setdefault((kind, variant, name), []).append(reference_rates[kind, tuple(pin)])
          continue
        cmd = pin + [sys.executable, os.path.abspath(__file__), f'--data_dir={photos_dir}',
                     f'--batch={args.batch}', f'--image_size={args.image_size}',
                     f'--warmup={args.warmup}', f'--batches={args.batches}',
                     '--one', kind, variant, str(workers)]
        result = run_case(cmd)
        results.setdefault((kind, variant, name), []).append(result['img_per_s'])
        if variant == 'reference':
          reference_rates[kind, tuple(pin)] = result['img_per_s']
        outputs[(kind, variant)] = result['output']
  header = f'{"pipeline":26}'
  for name, *_ in settings:
    header += f' {"img/s " + name:>17} {"grain/tf.data":>13}'
  print(header + f' {"1->2 workers":>12}  output')
  for kind, variant in cases:
    label = 'tf.data reference' if variant == 'reference' else f'grain {variant}'
    row = f'{kind + " " + label:26}'
    rates = {}
    for name, *_ in settings:
      rates[name] = rate = statistics.median(results[(kind, variant, name)])
      reference = results.get((kind, 'reference', name))
      ratio = (f'{rate / statistics.median(reference):12.2f}x'
               if reference and variant != 'reference' else f'{"-":>13}')
      row += f' {rate:17.1f} {ratio}'
    scaling = rates['2 workers'] / rates['1 worker']
    print(row + f' {scaling:11.2f}x  {outputs[(kind, variant)]}', flush=True)


if __name__ == '__main__':
  main()
