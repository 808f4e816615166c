"""ImageNet-style input pipeline throughput on realistic JPEGs, per CPU core and on all cores.

    python benchmarks/input_pipeline.py [--classes 50] [--per_class 10] [--batches 40]

Builds (once, in --data_dir) an ILSVRC-2012 manual_dir of about 500x375 JPEGs
made from real photos (resnet_jax.datasets.sample_imagenet), prepares it with the real
tfds `imagenet2012` builder, then times resnet_jax's training pipeline with the
paper's scale augmentation and with Inception crops, and the evaluation
pipeline (centre crop and 10-crop), each once pinned to one core (taskset) and
once on all cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CASES = [('train', 'scale'), ('train', 'inception'), ('eval', 'center'), ('eval', 'ten_crop')]


def config_for(data_dir: str, kind: str, variant: str, batch: int):
  from configs import imagenet  # pylint: disable=import-outside-toplevel
  config = imagenet.get_config('resnet50')
  config.data.data_dir = data_dir
  config.batch_size = config.eval_batch_size = batch
  config.data.shuffle_buffer = 512
  if kind == 'train':
    config.data.train_augment = variant
  else:
    config.data.eval_crop = variant
  return config


def measure(data_dir: str, kind: str, variant: str, batch: int, batches: int) -> dict:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from resnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  config = config_for(data_dir, kind, variant, batch)
  inp = input_pipeline.create_input(config, [0], 1)
  if kind == 'train':
    iterator = input_pipeline.train_iterator(config, inp)
  else:
    dataset = input_pipeline.eval_dataset(config, inp).repeat()
    iterator = iter(tfds.as_numpy(dataset))
  for _ in range(3):  # warm-up (fills prefetch and shuffle buffers)
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return {'kind': kind, 'variant': variant, 'img_per_s': batch * batches / seconds}


def prepare(data_dir: str, classes: int, per_class: int) -> None:
  from resnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from resnet_jax.datasets import sample_imagenet  # pylint: disable=import-outside-toplevel
  config = config_for(data_dir, 'train', 'scale', 32)
  builder = input_pipeline.get_builder(config.data, prepare=False)
  if builder.is_prepared():
    return
  manual = os.path.join(data_dir, 'manual')
  sample_imagenet.write_manual_dir(manual, train_per_class=per_class, num_val=classes,
                                   long_side=500)
  config.data.manual_dir = manual
  input_pipeline.prepare(config.data)
  shutil.rmtree(manual)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default='/tmp/resnet_jax_pipeline_bench')
  parser.add_argument('--classes', type=int, default=50)
  parser.add_argument('--per_class', type=int, default=10)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--one', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.data_dir, *args.one, args.batch, args.batches)))
    return
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  prepare(args.data_dir, args.classes, args.per_class)
  cores = os.cpu_count()
  print(f'{args.classes * args.per_class} train / {args.classes} val JPEGs of about 500x375; '
        f'batch {args.batch}, 224x224 output; {cores} cores')
  print(f'{"pipeline":24} {"img/s, 1 core":>14} {f"img/s, {cores} cores":>15}')
  for kind, variant in CASES:
    cmd = [sys.executable, os.path.abspath(__file__), f'--data_dir={args.data_dir}',
           f'--batch={args.batch}', f'--batches={args.batches}', '--one', kind, variant]
    figures = []
    for pin in (['taskset', '-c', '0'], []):
      out = subprocess.run(pin + cmd, capture_output=True, text=True, check=False)
      if out.returncode:
        raise SystemExit(out.stderr[-3000:])
      figures.append(json.loads(out.stdout.strip().splitlines()[-1])['img_per_s'])
    print(f'{kind + " " + variant:24} {figures[0]:14.1f} {figures[1]:15.1f}', flush=True)


if __name__ == '__main__':
  main()
