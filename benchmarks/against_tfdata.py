"""grain against the crop-first tf.data pipeline it replaced, on the same JPEGs, in one run.

    git worktree add /tmp/tfdata 8a4efbc^     # the last commit with the tf.data pipeline
    python benchmarks/against_tfdata.py --old_tree /tmp/tfdata --old_python PYTHON_WITH_TF

The tf.data pipeline (resnet_jax/input_pipeline.py until 8a4efbc) is timed by
its own tree's benchmark (`benchmarks/input_pipeline.py --one KIND VARIANT`,
run with --old_python, which needs TensorFlow) on the `imagenet2012` data set
that tree builds once from about 500x375 JPEGs of real photos (TFRecord);
this tree's grain pipeline reads the same records converted to ArrayRecord
(resnet_jax.data.convert, as `run.py --mode=convert` does). Cases: the
paper's scale augmentation, Inception crops and centre-crop evaluation, each
in a fresh process pinned with taskset to 1 core and to 2, in alternating
order (reversed every round); grain runs in the main process on 1 core, and
on 2 cores both with 2 worker processes and with 2 threads in one process.
Each case: --warmup batches of 32, then --batches timed; median of --repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import input_pipeline as pipeline_bench  # pylint: disable=wrong-import-position

CASES = [('train', 'scale'), ('train', 'inception'), ('eval', 'center')]
# (setting, cores, [(label, grain workers, threads)])
SETTINGS = [('1 core', 1, [('grain', 0, 1)]),
            ('2 cores', 2, [('grain, 2 workers', 2, 1), ('grain, 2 threads', 0, 2)])]
BATCH = 32


def measure(data_dir: str, kind: str, variant: str, workers: int, threads: int, warmup: int,
            batches: int) -> dict:
  """This tree's pipeline, in this process, on the converted imagenet2012."""
  return pipeline_bench.measure(data_dir, kind, variant, workers, BATCH, 224, warmup, batches,
                                threads=threads, name='imagenet2012', eval_split='validation')


def prepare(args) -> tuple[str, str]:
  """(the old tree's TFRecord data_dir, this tree's ArrayRecord copy), built once."""
  from resnet_jax.data import convert  # pylint: disable=import-outside-toplevel
  old_dir = os.path.join(args.data_dir, f'tfrecord_{args.train_images}')
  new_dir = os.path.join(args.data_dir, f'array_record_{args.train_images}')
  if not os.path.exists(os.path.join(new_dir, 'done')):
    script = ('import sys; sys.path[:0] = [".", "benchmarks"]; import input_pipeline; '
              f'print(input_pipeline.prepare({old_dir!r}, {args.train_images}))')
    subprocess.run([args.old_python, '-c', script], cwd=args.old_tree, check=True,
                   capture_output=True)
    shutil.rmtree(new_dir, ignore_errors=True)
    shutil.copytree(old_dir, new_dir)
    (version_dir,) = [root for root, _, files in os.walk(new_dir)
                      if 'dataset_info.json' in files]
    convert.convert(version_dir)
    for name in os.listdir(version_dir):
      if '.tfrecord-' in name:
        os.remove(os.path.join(version_dir, name))
    open(os.path.join(new_dir, 'done'), 'w').close()
  return old_dir, new_dir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--old_tree', required=True, help='a checkout of 8a4efbc^')
  parser.add_argument('--old_python', required=True, help='a Python with TensorFlow, tfds, '
                      'jax and the old tree\'s other dependencies')
  parser.add_argument('--data_dir', default='/tmp/resnet_jax_against_tfdata')
  parser.add_argument('--train_images', type=int, default=2000)
  parser.add_argument('--warmup', type=int, default=10)
  parser.add_argument('--batches', type=int, default=60)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--one', nargs=5, help=argparse.SUPPRESS)  # kind variant workers threads dir
  args = parser.parse_args()
  if args.one:
    kind, variant, workers, threads, data_dir = args.one
    print(json.dumps(measure(data_dir, kind, variant, int(workers), int(threads), args.warmup,
                             args.batches)))
    return
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  old_dir, new_dir = prepare(args)
  rates = {}
  for repeat in range(args.repeats):
    for setting, cores, grains in SETTINGS:
      pin, note = pipeline_bench.pinning(cores)
      runs = [(kind, variant, row) for kind, variant in CASES
              for row in [('tf.data crop-first', None, None)] + grains]
      for kind, variant, (label, workers, threads) in runs[::1 if repeat % 2 == 0 else -1]:
        if workers is None:
          cmd, cwd = [args.old_python, 'benchmarks/input_pipeline.py', f'--data_dir={old_dir}',
                      f'--warmup={args.warmup}', f'--batches={args.batches}', '--one', kind,
                      variant], args.old_tree
        else:
          cmd, cwd = [sys.executable, os.path.abspath(__file__), '--old_tree=-', '--old_python=-',
                      f'--warmup={args.warmup}', f'--batches={args.batches}', '--one', kind,
                      variant, str(workers), str(threads), new_dir], None
        result = pipeline_bench.run_case(pin + cmd, cwd)
        rates.setdefault((kind, variant, setting, label), []).append(result['img_per_s'])
      print(f'round {repeat + 1}, {setting} ({note}) done', flush=True)
  print(f'{"case":16} {"setting":8} {"pipeline":20} {"img/s":>8} {"/ tf.data":>9}  runs')
  for kind, variant in CASES:
    for setting, _, grains in SETTINGS:
      base = statistics.median(rates[kind, variant, setting, 'tf.data crop-first'])
      for label, *_ in [('tf.data crop-first',)] + grains:
        runs = rates[kind, variant, setting, label]
        rate = statistics.median(runs)
        print(f'{kind + " " + variant:16} {setting:8} {label:20} {rate:8.1f} '
              f'{rate / base:8.2f}x  {" ".join(f"{r:.0f}" for r in runs)}', flush=True)


if __name__ == '__main__':
  main()
