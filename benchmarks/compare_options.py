"""Train-step speed of model-option variants, measured in one process, interleaved.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/compare_options.py \
        --variant cpu_kernels=off --variant cpu_kernels=on

Why: on a shared machine, separate runs of the same step vary by 5% or more
(other tenants, memory bandwidth), which hides changes of that size. Here
every variant is compiled in the same process and timed in alternating blocks
of --steps steps, so slow spells hit all of them; the table gives each
variant's median block (img/s) and the process CPU time per step (user and
system) in that block. A variant is a comma-separated list of config.model
options and config.cpu_kernels (KEY=VALUE, Python literals); an empty one is
the defaults.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_step  # pylint: disable=wrong-import-position
from resnet_jax.cpu import malloc  # pylint: disable=wrong-import-position


def main() -> None:
  malloc.reexec_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', type=train_step.parse_options, action='append',
                      required=True, metavar='KEY=VALUE,...',
                      help='config.model options or cpu_kernels, e.g. cpu_kernels=off (repeat)')
  parser.add_argument('--model', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--image', type=int, default=32)
  parser.add_argument('--parallel', choices=('jit', 'pmap'), default='jit')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--steps', type=int, default=10, help='steps per timed block')
  parser.add_argument('--blocks', type=int, default=6, help='timed blocks per variant')
  args = parser.parse_args()
  if args.steps < 1 or args.blocks < 1:
    parser.error('--steps and --blocks must be at least 1')
  import jax  # pylint: disable=import-outside-toplevel
  for options in args.variant:  # fail on a typo before anything compiles
    try:
      train_step.check_options(args.model, options)
    except ValueError as e:
      parser.error(str(e))

  runs = []
  for options in args.variant:
    step, state, batches = train_step.build(args.model, args.batch, args.image, args.parallel,
                                            args.dtype, options)
    for i in range(3):  # compile and warm up
      state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    runs.append({'options': options, 'step': step, 'state': state, 'batches': batches,
                 'blocks': []})
  for block in range(args.blocks):
    for run in runs if block % 2 == 0 else runs[::-1]:  # no variant always goes first
      usage = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      state = run['state']
      for i in range(args.steps):
        state, metrics = run['step'](state, run['batches'][i % 2])
      jax.block_until_ready(metrics)
      seconds = time.perf_counter() - start
      after = resource.getrusage(resource.RUSAGE_SELF)
      run['state'] = state
      run['blocks'].append((args.batch * args.steps / seconds,
                            1e3 * (after.ru_utime - usage.ru_utime) / args.steps,
                            1e3 * (after.ru_stime - usage.ru_stime) / args.steps))

  print(f'$ python {" ".join(sys.argv)}')
  print(f'{args.model}, batch {args.batch}, {args.image}x{args.image}, {args.dtype}, '
        f'{args.parallel} on {jax.device_count()} XLA device(s), {len(os.sched_getaffinity(0))} CPU cores, '
        f'{args.blocks} blocks of {args.steps} steps per variant')
  print(f'{"variant":44} {"img/s":>7} {"CPU ms/step":>12} {"of it system":>12}  blocks (img/s)')
  for run in runs:
    blocks = sorted(run['blocks'])
    ips, user, system = blocks[len(blocks) // 2]
    name = ', '.join(f'{k}={v}' for k, v in run['options'].items()) or 'defaults'
    print(f'{name:44} {ips:7.1f} {user + system:12.0f} {system:12.0f}  '
          + ' '.join(f'{b[0]:.0f}' for b in run['blocks']))


if __name__ == '__main__':
  main()
