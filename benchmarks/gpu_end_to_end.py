"""ResNet-50 trained from JPEGs through run.py on an accelerator host without TensorFlow.

Does the input pipeline feed an accelerator? Trains ResNet-50 (bfloat16, batch
256) through `run.py` on a `sample_photos` data set of JPEGs of real photos
(about 500x375) and prints its training images/s beside
`benchmarks/gpu_bench.py`'s rate for the same model, dtype and batch on
synthetic data (the step alone), their ratio (target >= 0.9x) and the host's
CPU cores.

An accelerator host here has jax, flax, optax, orbax-checkpoint, pillow and
opencv but no TensorFlow, tfds, grain, clu or ml_collections, and no network.
So, on a machine with a network:

    python benchmarks/gpu_end_to_end.py bundle [--out .gpu_bundle]

puts the wheels of what such a host lacks (for its Python, --python 3.12),
pinned to the versions installed here, and the photos the data set is made
from (the host lacks scikit-learn and scikit-image) in one folder of at most
60 MiB. Carry it to the host and run:

    python benchmarks/gpu_end_to_end.py run --bundle .gpu_bundle

which unpacks the wheels into the bundle (first on the path; only packages the
host lacks are bundled, so nothing of its own is shadowed), writes --train_images JPEGs (10,000)
with the host's cores, trains --steps steps (each log window's
`images_per_sec` in metrics.jsonl, the median after the first window), then
runs gpu_bench.py. On CPU, as a smoke test (no bundle needed where the
packages are installed):

    python benchmarks/gpu_end_to_end.py run --model resnet20 --dtype float32 --image 32 \\
        --batch 8 --steps 4 --log_every 2 --train_images 64 --test_images 16
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BUNDLE_MIB = 60
# What run.py imports (training, evaluation, data preparation) that an accelerator host
# with jax, flax, optax, orbax-checkpoint, pillow, opencv and torch lacks: the difference
# between the distributions a run here loads (importlib.metadata.packages_distributions of
# sys.modules after a run) and those the host's packages require (their requirements,
# read on PyPI: absl-py, etils, fsspec, protobuf, msgpack, simplejson, ... are there).
BUNDLED = ('tensorflow-datasets', 'tensorflow-metadata', 'grain', 'array-record', 'clu',
           'ml-collections', 'tensorboardX', 'promise', 'six', 'immutabledict', 'dm-tree',
           'cloudpickle', 'flatbuffers', 'termcolor', 'toml', 'tqdm', 'wrapt', 'simplejson',
           'portpicker', 'googleapis-common-protos', 'requests', 'urllib3', 'idna',
           'certifi', 'charset-normalizer', 'attrs', 'importlib_resources', 'simplejpeg')
PURE_SOURCE_ONLY = ('promise',)  # no wheel on PyPI: built here (pure Python: any host)
# Imported before any device time is spent: a missing one is named at once.
REQUIRED_MODULES = ('jax', 'flax', 'optax', 'orbax.checkpoint', 'PIL', 'cv2',
                    'tensorflow_datasets', 'grain', 'array_record', 'clu.metrics',
                    'ml_collections', 'tensorboardX', 'simplejpeg')
WORKER_BUFFER = 2  # config.data.worker_buffer of the run (its default, passed explicitly)


def bundle(out: str, python: str) -> None:
  """Wheels (for `python`) of BUNDLED at this machine's versions, and the photos."""
  from resnet_jax.datasets import sample_imagenet  # pylint: disable=import-outside-toplevel
  wheels = os.path.join(out, 'wheels')
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(wheels)
  pins = {name: f'{name}=={importlib.metadata.version(name)}' for name in BUNDLED}
  pip = [sys.executable, '-m', 'pip']
  subprocess.run(pip + ['download', '--quiet', '--no-deps', '--only-binary=:all:',
                        '--python-version', python, '--implementation', 'cp',
                        '--platform', 'manylinux2014_x86_64', '--platform',
                        'manylinux_2_17_x86_64', '--platform', 'manylinux_2_28_x86_64',
                        '-d', wheels] + [pins[name] for name in BUNDLED
                                         if name not in PURE_SOURCE_ONLY], check=True)
  subprocess.run(pip + ['wheel', '--quiet', '--no-deps', '-w', wheels] +
                 [pins[name] for name in PURE_SOURCE_ONLY], check=True)
  if not all(name.endswith(('.whl',)) for name in os.listdir(wheels)):
    sys.exit(f'error: {wheels} holds files other than wheels')
  impure = [name for name in os.listdir(wheels) if name.startswith(PURE_SOURCE_ONLY) and
            not name.endswith('-none-any.whl')]
  if impure:
    sys.exit(f'error: {impure} built for this machine, not for any host')
  sample_imagenet.save_photos(os.path.join(out, 'photos.npz'))
  sizes = {name: os.path.getsize(os.path.join(root, name))
           for root, _, names in os.walk(out) for name in names}
  for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
    print(f'{size / 2**20:8.2f} MiB  {name}')
  total = sum(sizes.values()) / 2**20
  print(f'{total:8.2f} MiB  in {out} ({len(pins)} wheels for Python {python}, the photos)')
  if total > MAX_BUNDLE_MIB:
    sys.exit(f'error: the bundle is {total:.1f} MiB, over the {MAX_BUNDLE_MIB} MiB a host takes')


def activate(bundle_dir: str) -> dict[str, str]:
  """Unpacks the bundle's wheels (once) and puts them on this process's and its children's
  path; returns the children's environment."""
  env = dict(os.environ)
  if not bundle_dir:
    return env
  site = os.path.join(bundle_dir, 'site')
  wheels = sorted(os.listdir(os.path.join(bundle_dir, 'wheels')))
  marker = os.path.join(site, '.unpacked')
  if not os.path.exists(marker) or open(marker).read() != '\n'.join(wheels):
    shutil.rmtree(site, ignore_errors=True)
    for wheel in wheels:
      with zipfile.ZipFile(os.path.join(bundle_dir, 'wheels', wheel)) as archive:
        archive.extractall(site)
    with open(marker, 'w') as f:
      f.write('\n'.join(wheels))
  sys.path.insert(0, site)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (site, env.get('PYTHONPATH', '')) if p)
  return env


def check_modules() -> None:
  missing = []
  for name in REQUIRED_MODULES:
    try:
      importlib.import_module(name)
    except ImportError as e:
      missing.append(f'{name} ({e})')
  if missing:
    sys.exit('error: cannot import ' + '; '.join(missing) + ': install them, or build the '
             'bundle with `python benchmarks/gpu_end_to_end.py bundle` and pass --bundle.')


def build_data(data_dir: str, train: int, test: int, photos: str, env: dict) -> float:
  """Writes the sample_photos data set once; seconds it took (0 if it was there)."""
  if os.path.exists(os.path.join(data_dir, 'sample_photos', '1.0.0', 'dataset_info.json')):
    return 0.0
  start = time.perf_counter()
  command = [sys.executable, '-m', 'resnet_jax.datasets.sample_photos', data_dir,
             '--train', str(train), '--test', str(test)] + (['--photos', photos] if photos else [])
  subprocess.run(command, check=True, cwd=REPO, env=env)
  return time.perf_counter() - start


def run_command(args: argparse.Namespace, data_dir: str, workdir: str) -> list[str]:
  """run.py on the data set: configs/imagenet.py's recipe (scale augmentation, per-pixel
  mean, PCA lighting), with gpu_bench.py's model settings (no BN groups) so both time the
  same step; evaluation and checkpoints only at the end."""
  size = args.image
  return [sys.executable, os.path.join(REPO, 'run.py'), f'--config={REPO}/configs/imagenet.py',
          f'--workdir={workdir}', f'--config.model.name={args.model}',
          f'--config.model.dtype={args.dtype}', '--config.model.bn_group_size=0',
          '--config.data.name=sample_photos', f'--config.data.data_dir={data_dir}',
          '--config.data.eval_split=test', f'--config.data.image_size={size}',
          f'--config.data.eval_resize={round(size * 256 / 224)}',
          f'--config.data.scale_range=({round(size * 256 / 224)},{round(size * 480 / 224)})',
          '--config.data.final_eval_crop=', f'--config.data.workers={args.workers}',
          f'--config.data.worker_buffer={WORKER_BUFFER}',
          f'--config.batch_size={args.batch}', f'--config.eval_batch_size={args.batch}',
          f'--config.num_train_steps={args.steps}', f'--config.log_every_steps={args.log_every}',
          '--config.eval_every_steps=1000000000', '--config.checkpoint_every_steps=1000000000']


def training_rate(workdir: str) -> tuple[float, int]:
  """Median `images_per_sec` of the log windows after the first, and their number."""
  rates = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'images_per_sec' in record:
        rates.append(record['images_per_sec'])
  if len(rates) < 2:
    sys.exit(f'error: {len(rates)} log windows in {workdir}/metrics.jsonl; raise --steps or '
             'lower --log_every to get at least 2.')
  return statistics.median(rates[1:]), len(rates) - 1


def synthetic_rate(args: argparse.Namespace, env: dict) -> tuple[float, str]:
  """gpu_bench.py's img/s for the same model, dtype, batch and image size, and the device."""
  command = [sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_bench.py'),
             f'--model={args.model}', f'--batch={args.batch}', f'--image={args.image}',
             f'--steps={args.bench_steps}', f'--cases={args.dtype}', '--no_torch']
  output = subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True,
                          text=True).stdout
  print(output, end='', flush=True)
  row = re.search(rf'^resnet_jax {re.escape(args.model)} {args.dtype}\s+([\d.]+)', output, re.M)
  device = re.search(r'^device: (.*)$', output, re.M)
  if not row:
    sys.exit('error: no resnet_jax row in gpu_bench.py\'s output (above)')
  return float(row.group(1)), device.group(1) if device else '?'


def workers_that_fit(args: argparse.Namespace) -> tuple[int, str]:
  """args.workers (-1: one per core), lowered to what /dev/shm holds (run.py would refuse
  more at start: a container may have 64 MiB of it), and a note if it was lowered."""
  from resnet_jax.data import inputs  # pylint: disable=import-outside-toplevel
  workers = wanted = inputs.resolve(args.workers)
  pair = 2 * args.batch * args.image * args.image * 3  # a training and an eval batch
  size = inputs.shared_memory_size()
  while workers and inputs.shared_memory_needed(workers, WORKER_BUFFER, pair) > size:
    workers -= 1
  if workers == wanted:
    return workers, ''
  return workers, (f' ({wanted} asked for; {inputs.SHARED_MEMORY} holds {size / 2**30:.2f} '
                   f'GiB{", so threads" if not workers else ""})')


def run(args: argparse.Namespace) -> None:
  env = activate(args.bundle)
  check_modules()
  args.workers, lowered = workers_that_fit(args)
  photos = os.path.join(args.bundle, 'photos.npz') if args.bundle else ''
  data_dir = os.path.join(args.data_dir, f'photos_{args.train_images}_{args.test_images}')
  build_s = build_data(data_dir, args.train_images, args.test_images, photos, env)
  with tempfile.TemporaryDirectory() as workdir:
    command = run_command(args, data_dir, workdir)
    print('$ ' + ' '.join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO, env=env)
    end_to_end, windows = training_rate(workdir)
  synthetic, device = synthetic_rate(args, env)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  print(f'\n{args.model} ({args.dtype}), batch {args.batch}, {args.image}x{args.image}, on '
        f'{device}; {cores} CPU cores, grain workers={args.workers}{lowered}; '
        f'{args.train_images} JPEGs (written in {build_s:.0f} s; 0: already there)')
  print(f'{"run.py from JPEGs":34} {end_to_end:9.1f} img/s  (median of {windows} log windows '
        f'of {args.log_every} steps after the first)')
  print(f'{"gpu_bench.py, synthetic":34} {synthetic:9.1f} img/s')
  print(f'{"JPEGs / synthetic":34} {end_to_end / synthetic:9.2f}x  (target >= 0.9x)')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  make = commands.add_parser('bundle', help='the wheels and photos for a host without them')
  make.add_argument('--out', default=os.path.join(REPO, '.gpu_bundle'))
  make.add_argument('--python', default='3.12', help="the accelerator host's Python")
  go = commands.add_parser('run', help='train from JPEGs, then the synthetic benchmark')
  go.add_argument('--bundle', default='', help='a folder from `bundle` (none: use what is '
                  'installed)')
  go.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'resnet_jax_e2e'))
  go.add_argument('--train_images', type=int, default=10_000)
  go.add_argument('--test_images', type=int, default=500)
  go.add_argument('--model', default='resnet50')
  go.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  go.add_argument('--image', type=int, default=224)
  go.add_argument('--batch', type=int, default=256)
  go.add_argument('--steps', type=int, default=300)
  go.add_argument('--log_every', type=int, default=25)
  go.add_argument('--bench_steps', type=int, default=50, help="gpu_bench.py's timed steps")
  go.add_argument('--workers', type=int, default=-1,
                  help='grain worker processes (config.data.workers; -1: one per core)')
  args = parser.parse_args()
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  sys.path.insert(0, REPO)  # resnet_jax, for either command
  if args.command == 'bundle':
    bundle(args.out, args.python)
  else:
    run(args)


if __name__ == '__main__':
  main()
