"""Start-up setting for glibc's malloc: back big allocations with huge pages.

Why: XLA:CPU allocates each step's temporary buffers afresh, and glibc serves
and frees blocks that big with mmap/munmap, so every step the kernel faults in
and zeroes tens of thousands of new 4 KiB pages (docs/performance.md has the
figures). With the glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) those
blocks are marked MADV_HUGEPAGE and the faults drop by far.

glibc reads its tunables once, when a process starts, so the entry points
(run.py where the CPU plugin may run, the CPU benchmarks) restart themselves
with it set. This module imports only the standard library and must run
before anything heavy.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
SETTING = f'{TUNABLE}=1'


def environ_with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` with the tunable added to GLIBC_TUNABLES; a value already given is kept.

  Set GLIBC_TUNABLES=glibc.malloc.hugetlb=0 to opt out.
  """
  env = dict(environ)
  tunables = env.get('GLIBC_TUNABLES', '')
  if TUNABLE not in tunables:
    env['GLIBC_TUNABLES'] = f'{tunables}:{SETTING}' if tunables else SETTING
  return env


def reexec_with_huge_pages() -> None:
  """Restarts this process (same pid, arguments and environment) with the tunable set.

  Does nothing off Linux/glibc, when the tunable is already set (so it restarts
  at most once), or when the interpreter cannot be found.
  """
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return
  env = environ_with_huge_pages(os.environ)
  if env.get('GLIBC_TUNABLES') == os.environ.get('GLIBC_TUNABLES') or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
