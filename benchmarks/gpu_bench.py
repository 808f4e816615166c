"""ResNet-50 training throughput on one accelerator: resnet_jax (bf16, f32) and, if present, PyTorch.

    python benchmarks/gpu_bench.py                       # ResNet-50, 224x224, batch 256
    python benchmarks/gpu_bench.py --cases=bfloat16,bfloat16+two_pass_variance,torch
    python benchmarks/gpu_bench.py --model=resnet18 --batch=4 --image=64 --steps=2   # CPU smoke run

Needs only jax (with CUDA), flax and optax: synthetic data lives on the device,
and resnet_jax's model and step modules import neither TensorFlow nor tfds,
clu or ml_collections. Prints, per case, images/s, step time, compile time
and MFU: model FLOPs (3 x 2 x the conv and dense multiply-adds per image, by
`resnet_jax.summary`, times the batch) per step time over --peak_tflops (the
default 790 is an H200's measured bf16 matrix rate, used for both dtypes).
XLA's own cost analysis is no use here: on GPUs the convolutions are cuDNN
custom calls that it counts as zero FLOPs.
A case is a dtype, optionally with `+fast_variance` or `+two_pass_variance`
(BN statistics in one or two passes; the default is one pass off CPUs) and
`+stride3x3` (the stride on the 3x3 conv, as in torchvision), or `torch`.
Where torch and torchvision are installed, their resnet50 (channels_last, bf16
autocast, torch.compile where it works) runs side by side on the same device.
Each row prints as soon as it is measured, and a failing case prints its error
and lets the others run, so one call on a lent machine always reports.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
import traceback
import types
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# JAX would take 75% of the GPU's memory at start; leave half to PyTorch's run.
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')


# What a case's `+option` sets on the model (stride3x3: torchvision's "v1.5" bottleneck).
CASE_OPTIONS = {'fast_variance': {'bn_fast_variance': True},
                'two_pass_variance': {'bn_fast_variance': False},
                'stride3x3': {'bottleneck_stride': '3x3'}}


def parse_case(case: str) -> tuple[str, dict]:
  """'bfloat16+fast_variance' -> ('bfloat16', {'bn_fast_variance': True}); errors say why."""
  from resnet_jax import models  # pylint: disable=import-outside-toplevel
  dtype, *extras = case.split('+')
  if dtype not in models.DTYPES:
    raise ValueError(f'case {case!r}: dtype must be one of {", ".join(models.DTYPES)} '
                     '(or the case "torch")')
  unknown = set(extras) - set(CASE_OPTIONS)
  if unknown:
    raise ValueError(f'case {case!r}: unknown option(s) {", ".join(sorted(unknown))}; '
                     f'known: {", ".join(CASE_OPTIONS)}')
  return dtype, {k: v for extra in extras for k, v in CASE_OPTIONS[extra].items()}


def train_flops(model, image: int) -> float:
  """FLOPs of one training image: forward plus a backward of twice its cost."""
  from resnet_jax import summary  # pylint: disable=import-outside-toplevel
  return 3 * 2 * summary.multiply_adds(model, (image, image, 3))


def bench_config(lr: float = 0.1) -> types.SimpleNamespace:
  """The fields resnet_jax.optim and steps read, without ml_collections."""
  ns = types.SimpleNamespace
  return ns(batch_size=0, optimizer=ns(learning_rate=lr, momentum=0.9, nesterov=False,
                                       weight_decay=1e-4, decay_bn_and_bias=False,
                                       base_batch_size=0),
            schedule=ns(name='constant', unit='steps', boundaries=(), factor=0.1,
                        warmup_length=0.0, warmup_lr=0.0, warmup_until_error=0.8))


def bench_jax(model_name: str, batch: int, image: int, case: str, steps: int,
              peak_tflops: float, trace_dir: str = '') -> dict:
  """The row of one resnet_jax case (see `parse_case`), measured on the default device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import functools  # pylint: disable=import-outside-toplevel
  from resnet_jax import backend, models, optim, steps as steps_lib  # pylint: disable=import-outside-toplevel

  dtype, options = parse_case(case)
  config = bench_config()
  # The trainer's backend defaults (one-pass BN variance off CPUs), then the case's options.
  options = {**backend.model_defaults({'bn_fast_variance': options.get('bn_fast_variance')}),
             **options}
  model = models.create_model(model_name, 1000, dtype=dtype, **options)
  tx = optim.create_optimizer(config.optimizer)
  schedule = optim.schedule_fn(config.schedule, config.optimizer.learning_rate, 1, steps)
  train_fn, _ = steps_lib.make_steps(
      model, tx, functools.partial(optim.learning_rate, config.schedule, schedule))
  state = jax.jit(lambda rng: steps_lib.create_train_state(
      model, tx, optim.init_schedule_state(config.schedule), (image, image, 3),
      rng))(jax.random.key(0))
  key_x, key_y = jax.random.split(jax.random.key(1))
  batch_data = {'image': jax.random.normal(key_x, (batch, image, image, 3), jnp.float32),
                'label': jax.random.randint(key_y, (batch,), 0, 1000)}
  step = jax.jit(train_fn, donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch_data).compile()
  compile_s = time.perf_counter() - start
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch_data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch_data)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  if trace_dir:  # a profile of 3 more steps, for kernel-level times (TensorBoard / xprof)
    with jax.profiler.trace(os.path.join(trace_dir, case)):
      for _ in range(3):
        state, metrics = compiled(state, batch_data)
      jax.block_until_ready(metrics)
  return {'name': f'resnet_jax {model_name} {case}', 'img_per_s': batch / step_s,
          'step_ms': 1e3 * step_s, 'compile_s': compile_s,
          'mfu': train_flops(model, image) * batch / step_s / (peak_tflops * 1e12)}


def bench_torch(model_name: str, batch: int, image: int, steps: int,
                peak_tflops: float) -> Iterator[dict]:
  """Rows for torchvision's model, eager then compiled; none without torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f'torch case skipped: {e}', flush=True)
    return
  from resnet_jax import models  # pylint: disable=import-outside-toplevel
  # torchvision's bottleneck nets stride the 3x3 conv ("v1.5"): count their FLOPs so.
  options = (CASE_OPTIONS['stride3x3']
             if 'bottleneck_stride' in models.model_options(model_name) else {})
  flops = train_flops(models.create_model(model_name, 1000, **options), image)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  for compiled in (False, True):
    model = getattr(torchvision.models, model_name)().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, image, image, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    forward = torch.compile(model) if compiled else model
    name = f'torch {model_name} bf16 autocast, channels_last{", compile" if compiled else ""}'

    def step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(forward(x), y)
      loss.backward()
      optimizer.step()

    try:
      start = time.perf_counter()
      step()
      _sync(torch, device)
      first = time.perf_counter() - start
      step()
      _sync(torch, device)
      start = time.perf_counter()
      for _ in range(steps):
        step()
      _sync(torch, device)
    except Exception:  # pylint: disable=broad-except  (torch.compile may fail here)
      yield {'name': name, 'error': traceback.format_exc()}
      continue
    step_s = (time.perf_counter() - start) / steps
    yield {'name': name, 'img_per_s': batch / step_s, 'step_ms': 1e3 * step_s,
           'compile_s': first - step_s, 'mfu': flops * batch / step_s / (peak_tflops * 1e12)}


def _sync(torch, device):
  if device == 'cuda':
    torch.cuda.synchronize()


def _versions() -> str:
  names = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision')
  found = []
  for name in names:
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  return ', '.join(found)


def _print_row(r: dict) -> None:
  print(f'{r["name"]:66} {r["img_per_s"]:9.1f} {r["step_ms"]:9.1f} {r["compile_s"]:9.1f} '
        f'{100 * r["mfu"]:5.1f}%', flush=True)


def _rows(case: str, args: argparse.Namespace) -> Iterator[dict]:
  if case == 'torch':
    yield from bench_torch(args.model, args.batch, args.image, args.steps, args.peak_tflops)
  else:
    yield bench_jax(args.model, args.batch, args.image, case, args.steps, args.peak_tflops,
                    args.trace_dir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--image', type=int, default=224)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--cases', '--dtypes', default='bfloat16,float32,torch',
                      help='run in this order: dtypes, each with optional +' +
                      ', +'.join(CASE_OPTIONS) + ' (e.g. bfloat16+fast_variance), and '
                      'torch (torchvision, eager and compiled, where installed)')
  parser.add_argument('--peak_tflops', type=float, default=790.0)
  parser.add_argument('--no_torch', action='store_true', help='skip the torch case')
  parser.add_argument('--trace_dir', default='',
                      help='if set, profile 3 more steps of each resnet_jax case into '
                      'TRACE_DIR/CASE (open with TensorBoard or xprof)')
  args = parser.parse_args()
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  print(f'{args.model}, batch {args.batch}, {args.image}x{args.image}, synthetic data; '
        f'{_versions()}', flush=True)
  print(f'{"implementation":66} {"img/s":>9} {"step ms":>9} {"compile s":>9} {"MFU":>6}',
        flush=True)
  cases = [c for c in args.cases.split(',') if not (c == 'torch' and args.no_torch)]
  for case in cases:  # every case checked before any device time is spent
    if case != 'torch':
      try:
        parse_case(case)
      except ValueError as e:
        parser.error(str(e))
  failures = 0
  for case in cases:
    try:
      for row in _rows(case, args):
        if 'error' in row:
          failures += 1
          print(f'{row["name"]} failed:\n{row["error"]}', flush=True)
        else:
          _print_row(row)
    except Exception:  # pylint: disable=broad-except  (report it and run the other cases)
      failures += 1
      print(f'{args.model} case {case} failed:\n{traceback.format_exc()}', flush=True)
  import jax  # pylint: disable=import-outside-toplevel
  print(f'device: {jax.devices()[0].device_kind}', flush=True)
  if failures:
    sys.exit(1)


if __name__ == '__main__':
  main()
