"""Where the CPU train step's time goes: each XLA op's time on one core, grouped.

    python benchmarks/cpu_step_profile.py [--model resnet20] [--batch 128] [--image 32]

Pins itself to one CPU core and runs the real train step (jit, one XLA
device): XLA:CPU then runs every op inline, one after the other, so each op's
time in the profiler trace is its own (on more cores, convolutions on XLA's
Eigen path run asynchronously and their trace events show almost nothing).
The trace's per-op times are matched by name to the compiled step's HLO and
grouped: convolutions by path (oneDNN call, YNNPACK fusion or Eigen), window
and output shape (a window as large as the feature map, with the kernel's
shape as output, is a kernel gradient); oneDNN kernel gradients (resnet_jax's
extension) by kernel shape; then transposes, reductions and other fusions.
Time the whole step with benchmarks/train_step.py; this script is for finding
what to speed up.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_step  # pylint: disable=wrong-import-position
from resnet_jax.cpu import malloc  # pylint: disable=wrong-import-position
from resnet_jax.cpu import onednn_conv  # pylint: disable=wrong-import-position


def op_kinds(hlo_text: str) -> dict[str, str]:
  """Maps each instruction of the entry computation to a group name."""
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r'\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.S)}
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  kinds = {}
  for line in entry.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = \S+ ([\w\-]+)\(', line)
    if not m:
      continue
    name, opcode = m.groups()
    called = re.search(r'calls=%([\w.\-]+)', line)
    body = bodies.get(called.group(1), '') if called else line
    conv = re.search(r'= (\w+\[[\d,]*\])\S* convolution\(.*?(window=\{[^}]*\}).*?'
                     r'(dim_labels=[\w>\-]+)', body)
    onednn = re.search(r'= (\w+\[[\d,]*\])\S* custom-call\(.*__onednn\$convolution', line)
    kernel_grad = re.search(r'= (\w+\[[\d,]*\])\S* custom-call\(.*'
                            + onednn_conv.KERNEL_GRAD_TARGET, line)
    if onednn:
      kinds[name] = f'conv oneDNN (cpu plugin) -> {onednn.group(1)}'
    elif kernel_grad:
      kinds[name] = f'kernel gradient oneDNN (cpu plugin) -> {kernel_grad.group(1)}'
    elif conv:
      path = 'YNNPACK' if called else 'Eigen'
      kinds[name] = f'conv {path} {conv.group(2)} {conv.group(3)} -> {conv.group(1)}'
    elif opcode == 'dot' or ' dot(' in body:
      kinds[name] = 'dot'
    elif 'transpose' in name or ('copy' in name and opcode == 'fusion'):
      kinds[name] = 'transpose/copy'
    elif ' reduce(' in body or ' reduce-window(' in body:
      kinds[name] = 'reduction fusion'
    elif opcode in ('all-reduce', 'all-gather', 'reduce-scatter'):
      kinds[name] = 'collective'
    elif opcode == 'fusion':
      kinds[name] = 'elementwise fusion'
    else:
      kinds[name] = opcode
  return kinds


def op_times(trace_dir: str) -> dict[str, float]:
  """Total microseconds per op name on XLA's compute threads, from a jax.profiler trace."""
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
  if not paths:
    raise SystemExit(f'jax.profiler wrote no trace file under {trace_dir}.')
  path = paths[-1]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  threads = {(e['pid'], e.get('tid')): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  times = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'XLAEigen' in threads.get((e['pid'], e['tid']), ''):
      # A custom call's event is named NAME<target> (and an 'end: ...' marker follows).
      times[e['name'].removesuffix(onednn_conv.TARGET)] += e['dur']
  if not times:
    raise SystemExit('The trace has no events from XLA:CPU compute threads (named XLAEigen); '
                     'this jax version may name them differently.')
  return times


def main() -> None:
  malloc.reexec_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--image', type=int, default=32)
  parser.add_argument('--steps', type=int, default=3, help='profiled steps (after 2 warm-up)')
  parser.add_argument('--cpu', type=int, help='the core to run on (default: the first allowed)')
  parser.add_argument('--rows', type=int, default=25, help='groups to print')
  parser.add_argument('--options', type=train_step.parse_options, default={},
                      metavar='KEY=VALUE,...',
                      help='config.model options or cpu_kernels, e.g. cpu_kernels=off')
  args = parser.parse_args()
  if not hasattr(os, 'sched_setaffinity'):
    raise SystemExit('Pinning to one core needs os.sched_setaffinity (Linux).')
  if args.cpu is None:
    args.cpu = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {args.cpu})  # before jax starts its thread pools
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=1').strip()
  import jax  # pylint: disable=import-outside-toplevel

  step, state, (batch, _) = train_step.build(args.model, args.batch, args.image, 'jit',
                                             'float32', args.options)
  compiled = step.lower(state, batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    times = op_times(trace_dir)

  kinds = op_kinds(compiled.as_text())
  groups = collections.defaultdict(lambda: [0, 0.0])
  for name, kind in kinds.items():
    groups[kind][0] += 1
    groups[kind][1] += times.get(name, 0.0) / 1e3 / args.steps
  groups = {kind: v for kind, v in groups.items() if v[1] >= 0.05}
  total = sum(ms for _, ms in groups.values())
  print(f'$ python {" ".join(sys.argv)}')
  print(f'{args.model}, batch {args.batch}, {args.image}x{args.image}, float32, one XLA device '
        f'pinned to core {args.cpu}, jax {jax.__version__}: ops {total:.1f} ms per step '
        f'({wall_ms:.1f} ms wall under the profiler)')
  print(f'{"ms/step":>8} {"share":>6} {"ops":>4}  group')
  for kind, (count, ms) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:args.rows]:
    print(f'{ms:8.1f} {ms / total:6.1%} {count:4d}  {kind}')


if __name__ == '__main__':
  main()
