"""ResNet-20 training step on the CPU: resnet_jax against PyTorch eager, side by side.

    pip install torch==2.13.0   # CPU build; not a project dependency
    python benchmarks/cpu_vs_torch.py [--batch 128] [--threads 2] [--steps 10]

Both sides run the same network (ResNet-20, option A shortcuts, BN, SGD with
momentum 0.9 and weight decay 1e-4) on the same synthetic batch of 32x32
images, with the same number of CPU threads and the same malloc setting (huge
pages, as run.py sets it: resnet_jax/malloc.py). resnet_jax runs each of its
configurations in a fresh process (the XLA device count is fixed at start-up).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_step  # pylint: disable=wrong-import-position
from resnet_jax import malloc  # pylint: disable=wrong-import-position

JAX_CASES = [  # parallel, devices
    ('jit', 1),
    ('jit', 2),
    ('pmap', 2),
    ('jit', 4),
    ('pmap', 8),
]


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


def torch_images_per_second(batch: int, threads: int, steps: int, channels_last: bool) -> float:
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

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return batch * steps / (time.perf_counter() - start)


def main() -> None:
  malloc.reexec_with_huge_pages()  # PyTorch runs in this process
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  print(f'$ python {" ".join(sys.argv)}')
  print(f'CPU: {_cpu_name()}, {args.threads} threads, ResNet-20, batch {args.batch}, 32x32, '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")}')
  print(f'{"implementation":44} {"img/s":>8}')
  try:
    for channels_last in (False, True):
      ips = torch_images_per_second(args.batch, args.threads, args.steps, channels_last)
      name = f'PyTorch {__import__("torch").__version__} eager' + (
          ', channels_last' if channels_last else '')
      print(f'{name:44} {ips:8.1f}', flush=True)
  except ImportError:
    print('PyTorch is not installed: pip install torch==2.13.0 (CPU build)')
  step_args = argparse.Namespace(steps=args.steps, warmup=2, dtype='float32', huge_pages=True)
  for parallel, devices in JAX_CASES:
    r = train_step.run_case(step_args, 'resnet20', args.batch, 32, parallel, devices)
    name = f'resnet_jax {parallel}, {devices} XLA CPU device{"s" if devices > 1 else ""}'
    print(f'{name:44} {r["img_per_s"]:8.1f}', flush=True)


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
