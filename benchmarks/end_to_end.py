"""The real training loop fed from JPEGs and from synthetic data: does the input pipeline keep up?

    python benchmarks/end_to_end.py                                   # CPU: a tiny model, pipeline-bound
    python benchmarks/end_to_end.py --model=resnet50 --dtype=bfloat16 --batch=256   # an accelerator
    python benchmarks/end_to_end.py --quick                           # tiny: 32x32, a few steps

Runs `train.train_and_evaluate` (run.py's path: the input pipeline, prefetch
to the devices, the jitted step with the device-side augmentation, metrics)
twice in this process on the data set of benchmarks/input_pipeline.py (a
`sample_photos` data set of JPEGs of about 500x375 from real photos, written
without TensorFlow; configs/imagenet.py's scale augmentation, read with grain,
--workers worker processes): once reading the JPEGs, once with the pipeline
replaced by one fixed batch that it produced (synthetic: the same step, no
input cost). It prints each run's
training images/s (`images_per_sec` of metrics.jsonl: training time only, the
median log window after the first) and their ratio. With `--model=tiny` (a
stride-4 conv, BN and a classifier, defined here) the step costs next to
nothing, so the JPEG run measures what the pipeline feeds the loop.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import input_pipeline as pipeline_bench  # pylint: disable=wrong-import-position

QUICK = dict(train_images=64, test_images=16, image_size=32, batch=8, steps=6, log_every=2)


def tiny_model(num_classes: int):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from resnet_jax.batch_norm import BatchNorm  # pylint: disable=import-outside-toplevel

  class Tiny(nn.Module):
    """One stride-4 3x3 conv with BN, global pooling, a classifier."""

    @nn.compact
    def __call__(self, x, train=True):
      x = nn.Conv(16, (3, 3), 4, use_bias=False)(x)
      x = nn.relu(BatchNorm(use_running_average=not train)(x))
      return nn.Dense(num_classes)(jnp.mean(x, axis=(1, 2)))
  return Tiny()


def run(config, workdir: str, synthetic: bool) -> float:
  from unittest import mock  # pylint: disable=import-outside-toplevel
  from resnet_jax import models, train  # pylint: disable=import-outside-toplevel
  from resnet_jax.data import train_stream  # pylint: disable=import-outside-toplevel
  patches = []
  if config.model.name == 'tiny':
    patches.append(mock.patch.object(models, 'create_model_from_config',
                                     lambda model_config, num_classes, **_: tiny_model(num_classes)))
    patches.append(mock.patch.object(models, 'check_options', lambda *_: {}))
  if synthetic:
    real = train_stream.train_iterator

    def one_batch(*args, **kwargs):
      batches = real(*args, **kwargs)
      batch = next(batches)
      batches.close()  # grain's worker processes and their shared memory
      return (batch for _ in itertools.count())  # a generator: the trainer closes it
    patches.append(mock.patch.object(train_stream, 'train_iterator', one_batch))
  with contextlib.ExitStack() as stack:
    for patch in patches:
      stack.enter_context(patch)
    train.train_and_evaluate(config, workdir)
  from etils import epath  # pylint: disable=import-outside-toplevel
  from resnet_jax import run_log  # pylint: disable=import-outside-toplevel
  rates = [line['images_per_sec'] for line in run_log.read_metrics(
      epath.Path(workdir) / 'metrics.jsonl') if 'images_per_sec' in line]
  return statistics.median(rates[1:])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default='/tmp/resnet_jax_pipeline_bench')
  parser.add_argument('--train_images', type=int, default=5000)
  parser.add_argument('--test_images', type=int, default=500)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--workers', type=int, default=-1,
                      help='grain worker processes (config.data.workers; -1: one per core)')
  parser.add_argument('--model', default='tiny', help='tiny, or a model name (resnet50, ...)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=120)
  parser.add_argument('--log_every', type=int, default=20)
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes (a smoke test): ' + ', '.join(
                          f'{k}={v}' for k, v in QUICK.items()))
  if parser.parse_known_args()[0].quick:
    parser.set_defaults(**QUICK)
  args = parser.parse_args()
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  photos_dir, num_train, _ = pipeline_bench.prepare(args.data_dir, args.train_images,
                                                    args.test_images)
  import jax  # pylint: disable=import-outside-toplevel
  config = pipeline_bench.config_for(photos_dir, 'train', 'scale', args.batch, args.image_size)
  config.data.workers = args.workers
  config.data.final_eval_crop = ''  # the one evaluation at the end suffices
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.bn_group_size = 0
  config.num_train_steps = args.steps
  config.log_every_steps = args.log_every
  config.eval_every_steps = config.checkpoint_every_steps = 10**9  # the end only
  config.eval_batch_size = args.batch
  rates = {}
  with tempfile.TemporaryDirectory() as workdir:
    for name, synthetic in (('synthetic (one fixed batch)', True), ('JPEGs, scale augmentation',
                                                                     False)):
      rates[name] = run(config, os.path.join(workdir, name.split()[0]), synthetic)
  cores = len(os.sched_getaffinity(0))
  print(f'{args.model} ({args.dtype}), batch {args.batch}, {args.image_size}x{args.image_size}, '
        f'{num_train} JPEGs, grain workers={args.workers}, jit on {jax.device_count()} '
        f'{jax.default_backend()} device(s), {cores} CPU cores, {args.steps} steps, median of '
        'the log windows after the first')
  for name, rate in rates.items():
    print(f'{name:32} {rate:9.1f} img/s')
  (_, synthetic), (_, jpeg) = rates.items()
  print(f'{"JPEGs / synthetic":32} {jpeg / synthetic:9.2f}x')


if __name__ == '__main__':
  main()
