"""ResNet-20 training step on the CPU: resnet_jax against PyTorch eager, side by side.

    pip install torch==2.13.0   # CPU build; not a project dependency
    python benchmarks/cpu_vs_torch.py [--batch 128] [--threads 2] [--steps 10] [--rounds 8]

Both sides run the same network (ResNet-20, option A shortcuts, BN, SGD with
momentum 0.9 and weight decay 1e-4) on the same synthetic batch of 32x32
images, with the same number of CPU threads and the same malloc setting (huge
pages, as run.py sets it: resnet_jax/cpu/malloc.py).

Why interleaved: on a shared machine, back-to-back runs of the same step vary
by 5-10% (other tenants, memory bandwidth), as much as the differences to
measure. Each contender (PyTorch NCHW, PyTorch channels_last, each resnet_jax
configuration) therefore lives in its own worker process, compiled and warm,
and the workers take turns: in each of --rounds rounds every worker times one
block of --steps steps while the others wait idle, in an order that rotates
from round to round. The table gives each contender's median block and its
median ratio to PyTorch eager's block of the same round (a paired comparison:
a slow spell hits both sides of a ratio alike), with the lowest and highest
ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_step  # pylint: disable=wrong-import-position
from resnet_jax.cpu import malloc  # pylint: disable=wrong-import-position

JAX_CASES = [  # parallel, XLA devices
    ('jit', 1),
    ('jit', 2),
    ('pmap', 2),
    ('jit', 4),
]
TORCH = 'torch'
TORCH_CHANNELS_LAST = 'torch_channels_last'


def torch_resnet20():
  """ResNet-20 of the paper (Sec. 4.2) in PyTorch, option A shortcuts."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      shortcut = x[:, :, ::self.stride, ::self.stride]
      if self.extra:
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
      return F.relu(y + shortcut)

  layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
  cin = 16
  for i, width in enumerate((16, 32, 64)):
    for j in range(3):
      layers.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
      cin = width
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
  model = nn.Sequential(*layers)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
  return model


def jax_case(name: str) -> tuple[str, str, str]:
  """'jit:2' or 'pmap:8:--xla_flag=value ...' -> (parallel, XLA devices, extra XLA flags)."""
  parts = name.split(':', 2)
  return tuple(parts + [''] * (3 - len(parts)))


def torch_step(batch: int, threads: int, channels_last: bool):
  """PyTorch's train step (eager) on one synthetic batch, and a function that waits for it."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torch_resnet20()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(batch, 3, 32, 32)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 10, batch))
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()

  return step


def jax_step(batch: int, parallel: str):
  """resnet_jax's real train step (this process's XLA devices) as a no-argument function."""
  import jax  # pylint: disable=import-outside-toplevel
  step, state, batches = train_step.build('resnet20', batch, 32, parallel, 'float32')
  carry = {'state': state, 'i': 0, 'metrics': None}

  def run():
    carry['state'], carry['metrics'] = step(carry['state'], batches[carry['i'] % 2])
    carry['i'] += 1

  def wait():
    jax.block_until_ready(carry['metrics'])

  return run, wait


def worker(name: str, batch: int, threads: int) -> None:
  """Builds one contender, warms it up, then times blocks of steps on request.

  Protocol (stdin/stdout, one line each): it prints `ready`; each line `N` it
  reads makes it run N steps and print the seconds they took; EOF ends it.
  """
  if name in (TORCH, TORCH_CHANNELS_LAST):
    step, wait = torch_step(batch, threads, name == TORCH_CHANNELS_LAST), lambda: None
  else:
    step, wait = jax_step(batch, jax_case(name)[0])
  for _ in range(3):  # compile and warm up
    step()
  wait()
  print('ready', flush=True)
  for line in sys.stdin:
    steps = int(line)
    start = time.perf_counter()
    for _ in range(steps):
      step()
    wait()
    print(time.perf_counter() - start, flush=True)


def start_worker(name: str, args) -> subprocess.Popen:
  env = malloc.environ_with_huge_pages(os.environ)
  if name not in (TORCH, TORCH_CHANNELS_LAST):
    _, devices, flags = jax_case(name)
    env['XLA_FLAGS'] = train_step.xla_flags(devices, flags)
  return subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f'--worker={name}', f'--batch={args.batch}',
       f'--threads={args.threads}'],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def read_line(proc: subprocess.Popen, name: str) -> str:
  line = proc.stdout.readline()
  if not line:
    raise SystemExit(f'worker {name} died (exit status {proc.wait()}); its error is above')
  return line.strip()


def label(name: str) -> str:
  if name == TORCH:
    return f'PyTorch {__import__("torch").__version__} eager'
  if name == TORCH_CHANNELS_LAST:
    return f'PyTorch {__import__("torch").__version__} eager, channels_last'
  parallel, devices, flags = jax_case(name)
  return (f'resnet_jax {parallel}, {devices} XLA CPU device{"s" if devices != "1" else ""}'
          + (f', {flags}' if flags else ''))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--threads', type=int, default=2, help='PyTorch threads')
  parser.add_argument('--steps', type=int, default=10, help='steps per timed block')
  parser.add_argument('--rounds', type=int, default=8, help='timed blocks per contender')
  parser.add_argument('--jax', action='append', metavar='PARALLEL:DEVICES[:XLA_FLAGS]',
                      help='resnet_jax configurations (repeat), optionally with extra XLA '
                      'flags (space-separated); default: '
                      + ' '.join(f'{p}:{d}' for p, d in JAX_CASES))
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.batch, args.threads)
    return
  if args.steps < 1 or args.rounds < 1:
    parser.error('--steps and --rounds must be at least 1')
  jax_cases = args.jax or [f'{p}:{d}' for p, d in JAX_CASES]
  for case in jax_cases:
    parallel, devices, _ = jax_case(case)
    if parallel not in ('jit', 'pmap') or not devices.isdigit() or int(devices) < 1:
      parser.error(f'--jax {case}: expected jit:N or pmap:N (N XLA devices), then '
                   'optionally :XLA_FLAGS')
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    names = [TORCH, TORCH_CHANNELS_LAST]
  except ImportError:
    print('No comparison: PyTorch is not installed here (pip install torch==2.13.0, CPU '
          'build); resnet_jax only')
    names = []
  names += jax_cases
  print(f'$ python {" ".join(sys.argv)}')
  print(f'CPU: {_cpu_name()} ({os.cpu_count()} cores), PyTorch threads {args.threads}, '
        f'ResNet-20, batch {args.batch}, 32x32, {args.rounds} rounds of {args.steps} steps, '
        f'GLIBC_TUNABLES={malloc.environ_with_huge_pages(os.environ).get("GLIBC_TUNABLES", "")}',
        flush=True)
  workers = {}
  try:
    for name in names:  # one at a time: each builds and compiles on all cores
      workers[name] = start_worker(name, args)
      if read_line(workers[name], name) != 'ready':
        raise SystemExit(f'worker {name} did not start')
    seconds = {name: [] for name in names}
    for r in range(args.rounds):
      shift = r % len(names)
      for name in names[shift:] + names[:shift]:  # nobody always goes first
        workers[name].stdin.write(f'{args.steps}\n')
        workers[name].stdin.flush()
        seconds[name].append(float(read_line(workers[name], name)))
  finally:
    for proc in workers.values():
      proc.stdin.close()
      proc.wait()
  width = max(46, *(len(label(name)) for name in names))
  print(f'{"implementation":{width}} {"img/s":>7} {"vs PyTorch eager":>17} {"lowest":>7} '
        f'{"highest":>7}  blocks (img/s)')
  for name in names:
    rates = [args.batch * args.steps / s for s in seconds[name]]
    row = f'{label(name):{width}} {statistics.median(rates):7.1f}'
    if TORCH in seconds:
      ratios = [t / s for s, t in zip(seconds[name], seconds[TORCH])]
      row += f' {statistics.median(ratios):16.3f}x {min(ratios):6.3f}x {max(ratios):6.3f}x'
    else:
      row += ' ' * 35
    print(row + '  ' + ' '.join(f'{x:.0f}' for x in rates), flush=True)


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown'


if __name__ == '__main__':
  main()
