"""Train-step throughput: images/s and compile time, on synthetic data.

    python benchmarks/train_step.py                      # the default table (CPU)
    python benchmarks/train_step.py --model=resnet50 --batch=16 --image=224 --parallel=jit --devices=1

Runs each case in a fresh process (the number of XLA devices is fixed at
start-up), times `--steps` steps after `--warmup` and prints one table row each,
plus the command that made the table.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from resnet_jax.cpu import malloc  # pylint: disable=wrong-import-position

DEFAULT_CASES = [  # model, batch, image, parallel, devices
    ('resnet20', 128, 32, 'jit', 1),
    ('resnet20', 128, 32, 'jit', 2),
    ('resnet20', 128, 32, 'pmap', 2),
    ('resnet20', 128, 32, 'pmap', 8),
    ('resnet56', 128, 32, 'jit', 1),
    ('resnet56', 128, 32, 'jit', 2),
    ('resnet50', 16, 224, 'jit', 1),
    ('resnet50', 16, 224, 'jit', 2),
]


def parse_options(text: str) -> dict:
  """'key=value,key2=value2' -> config.model options, and cpu_kernels.

  Values are Python literals; a bare word (cpu_kernels=off) is a string.
  """
  options = {}
  for item in filter(None, text.split(',')):
    key, sep, value = item.partition('=')
    value = value.strip()
    if not sep or not key.strip() or not value:
      raise argparse.ArgumentTypeError(f'{item!r}: expected KEY=VALUE')
    try:
      options[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      if not value.isidentifier():
        raise argparse.ArgumentTypeError(
            f'{item!r}: expected KEY=VALUE with a Python literal or a word') from None
      options[key.strip()] = value
  return options


def check_options(model: str, options: dict) -> None:
  """A clear error for an option that the config or the model does not have."""
  from resnet_jax import backend, models  # pylint: disable=import-outside-toplevel
  options = dict(options)
  backend.cpu_kernel_mode(options.pop('cpu_kernels', 'auto'))
  models.check_options(model, options)


def build(model: str, batch: int, image: int, parallel: str, dtype: str,
          options: dict | None = None) -> tuple:
  """The real train step of resnet_jax (with the kernels the trainer would choose), its
  initial state and two synthetic batches. `options`: config.model options and cpu_kernels."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  from resnet_jax import assembly, backend, models  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.model.name, config.model.dtype = model, dtype
  for key, value in (options or {}).items():
    if key == 'cpu_kernels':
      config.cpu_kernels = value
    else:
      config.model[key] = value
  config.batch_size = config.eval_batch_size = batch
  config.parallel = parallel
  run_options = {**backend.model_defaults(config.model),
                 **backend.choose_cpu_kernels(config.cpu_kernels).model_options}
  strategy = assembly.create_strategy(config, lambda axis: models.create_model_from_config(
      config.model, 10 if image <= 64 else 1000, bn_axis_name=axis, **run_options),
      (image, image, 3), steps_per_epoch=100, steps_total=1000)
  state = strategy.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  batches = [strategy.put_batch({
      'image': rng.normal(size=(batch, image, image, 3)).astype(np.float32),
      'label': rng.integers(0, 10, batch).astype(np.int32)}) for _ in range(2)]
  return strategy.train_step, state, batches


def measure(model: str, batch: int, image: int, parallel: str, steps: int, warmup: int,
            dtype: str) -> dict:
  """Times the real train step of resnet_jax (this process's devices)."""
  import jax  # pylint: disable=import-outside-toplevel
  train_step, state, batches = build(model, batch, image, parallel, dtype)
  start = time.perf_counter()
  state, metrics = train_step(state, batches[0])
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  for i in range(warmup):
    state, metrics = train_step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = train_step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - start) / steps
  return {'model': model, 'batch': batch, 'image': image, 'parallel': parallel,
          'devices': jax.device_count(), 'dtype': dtype,
          'img_per_s': batch / step_time, 'step_ms': 1e3 * step_time,
          'compile_s': first - step_time}


def xla_flags(devices: int, extra: str = '') -> str:
  """The caller's XLA flags, then `extra`, then the number of (fake) CPU devices."""
  return ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''), extra,
                                f'--xla_force_host_platform_device_count={devices}']))


def run_case(args, model, batch, image, parallel, devices) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--one', f'--model={model}',
         f'--batch={batch}', f'--image={image}', f'--parallel={parallel}',
         f'--devices={devices}', f'--steps={args.steps}', f'--warmup={args.warmup}',
         f'--dtype={args.dtype}']
  env = (malloc.environ_with_huge_pages(os.environ) if args.huge_pages
         else {**os.environ, 'GLIBC_TUNABLES': f'{malloc.TUNABLE}=0'})
  env['XLA_FLAGS'] = xla_flags(devices)
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model')
  parser.add_argument('--batch', type=int)
  parser.add_argument('--image', type=int)
  parser.add_argument('--parallel', choices=('jit', 'pmap'))
  parser.add_argument('--devices', type=int, help='XLA devices (CPU: fake devices)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--huge_pages', action=argparse.BooleanOptionalAction, default=True,
                      help='glibc malloc with huge pages, as run.py sets it (resnet_jax/cpu/malloc.py)')
  parser.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.model, args.batch, args.image, args.parallel, args.steps,
                             args.warmup, args.dtype)))
    return
  if args.model:
    cases = [(args.model, args.batch or 128, args.image or 32, args.parallel or 'jit',
              args.devices or 1)]
  else:
    cases = DEFAULT_CASES
  print(f'$ python {" ".join(sys.argv)}')
  print(f'{"model":10} {"batch":>5} {"image":>5} {"parallel":8} {"devices":>7} {"dtype":8} '
        f'{"img/s":>8} {"step ms":>9} {"compile s":>9}')
  for case in cases:
    r = run_case(args, *case)
    print(f'{r["model"]:10} {r["batch"]:5d} {r["image"]:5d} {r["parallel"]:8} {r["devices"]:7d} '
          f'{r["dtype"]:8} {r["img_per_s"]:8.1f} {r["step_ms"]:9.1f} '
          f'{r["compile_s"]:9.1f}', flush=True)


if __name__ == '__main__':
  main()
