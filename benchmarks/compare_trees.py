"""The train step of two source trees (e.g. a git worktree of main and your change), side by side.

    git worktree add /tmp/before main
    python benchmarks/compare_trees.py --tree before=/tmp/before --tree after=. --devices 2

Why: a change's effect on the step (a few %) hides in the 5-10% that separate
runs vary on a shared machine. Each tree's step runs in its own warm worker
process (built by that tree's benchmarks/train_step.py, so with that tree's
defaults), and the workers take turns, one block of --steps steps each per
round, in alternating order; the table gives each tree's median block and the
median, lowest and highest per-round ratio of the last tree to the first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

WORKER = r'''
import json, os, sys, time
tree, model, batch, image, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
sys.path[:0] = [tree, os.path.join(tree, 'benchmarks')]
import jax, train_step
step, state, batches = train_step.build(model, batch, image, 'jit', 'float32')
for i in range(3):
  state, metrics = step(state, batches[i % 2])
jax.block_until_ready(metrics)
print('ready', flush=True)
for _ in sys.stdin:
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  print(json.dumps(batch * steps / (time.perf_counter() - start)), flush=True)
'''


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--tree', action='append', required=True, metavar='NAME=PATH',
                      help='a source tree (give two or more; ratios are to the first)')
  parser.add_argument('--model', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--image', type=int, default=32)
  parser.add_argument('--devices', type=int, default=1, help='XLA CPU devices')
  parser.add_argument('--steps', type=int, default=10, help='steps per timed block')
  parser.add_argument('--rounds', type=int, default=10)
  args = parser.parse_args()
  trees = dict(tree.split('=', 1) for tree in args.tree if '=' in tree)
  if len(trees) < 2 or len(trees) != len(args.tree):
    parser.error('give at least two --tree NAME=PATH')
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={args.devices}'}
  env.setdefault('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')  # as run.py sets it on CPUs
  workers = {}
  for name, path in trees.items():
    workers[name] = subprocess.Popen(
        [sys.executable, '-c', WORKER, os.path.abspath(path), args.model, str(args.batch),
         str(args.image), str(args.steps)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd='/')
    if workers[name].stdout.readline().strip() != 'ready':
      raise SystemExit(f'the worker of {name} ({path}) failed; run it alone to see why')
  rates = {name: [] for name in trees}
  names = list(trees)
  for r in range(args.rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      workers[name].stdin.write('go\n')
      workers[name].stdin.flush()
      rates[name].append(float(workers[name].stdout.readline()))
  for worker in workers.values():
    worker.stdin.close()
    worker.wait()
  print(f'$ python {" ".join(sys.argv)}')
  print(f'{args.model}, batch {args.batch}, {args.image}x{args.image}, jit on {args.devices} XLA '
        f'device(s), {len(os.sched_getaffinity(0))} CPU cores, {args.rounds} rounds of '
        f'{args.steps} steps')
  first = names[0]
  for name in names:
    ratios = [a / b for a, b in zip(rates[name], rates[first])]
    print(f'{name:16} {statistics.median(rates[name]):8.1f} img/s   ratio to {first}: median '
          f'{statistics.median(ratios):.3f} (lowest {min(ratios):.3f}, highest {max(ratios):.3f})'
          f'   blocks ' + ' '.join(f'{x:.0f}' for x in rates[name]))


if __name__ == '__main__':
  main()
