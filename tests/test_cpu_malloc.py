"""The CPU plugin's start-up malloc setting (resnet_jax/cpu/malloc.py): how and when it is set,
and that it works."""
import os
import platform
import subprocess
import sys

import pytest

from resnet_jax.cpu import malloc
from tests.support import helpers

pytestmark = pytest.mark.cpu_kernels

SHOW = "import os; print('{}', os.environ.get('GLIBC_TUNABLES'), flush=True)"


def test_the_tunable_is_added_and_a_given_value_is_kept():
  assert malloc.environ_with_huge_pages({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  env = malloc.environ_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'A': 'b'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'A': 'b'}
  opt_out = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert malloc.environ_with_huge_pages(opt_out) == opt_out


def _run(code, tunables):
  env = {**os.environ, 'GLIBC_TUNABLES': tunables}
  return subprocess.run([sys.executable, '-c', code, 'an-argument'], capture_output=True,
                        text=True, env=env, cwd=helpers.REPO, check=True).stdout.splitlines()


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_the_process_restarts_once_with_its_arguments_unless_the_tunable_is_set():
  code = (SHOW.format('start') + '\nimport sys\nfrom resnet_jax.cpu import malloc\n'
          'malloc.reexec_with_huge_pages()\n' + SHOW.format('end') + '\nprint(sys.argv[1:])')
  assert _run(code, '') == ['start ', 'start glibc.malloc.hugetlb=1',
                            'end glibc.malloc.hugetlb=1', "['an-argument']"]
  assert _run(code, 'glibc.malloc.hugetlb=0') == [
      'start glibc.malloc.hugetlb=0', 'end glibc.malloc.hugetlb=0', "['an-argument']"]


# run.py's modes stop right after the restart decision.
NO_RUN = SHOW.format('TUNABLES') + '\nfrom resnet_jax import cli\ncli.run = lambda *a, **k: None\n'


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
@pytest.mark.parametrize('args,env,restarts', [
    (['--workdir=/tmp/unused'], {}, True),                                      # a CPU host
    (['--workdir=/tmp/unused', '--config.cpu_kernels=off'], {}, False),
    (['--workdir=/tmp/unused'], {'RESNET_JAX_CPU_KERNELS': 'off'}, False),
    (['--workdir=/tmp/unused'], {'JAX_PLATFORMS': 'cuda'}, False),              # a GPU host
    (['--mode=describe'], {}, False),                                           # no steps run
])
def test_run_py_restarts_with_the_tunable_only_where_the_plugin_may_run(args, env, restarts):
  env = {'GLIBC_TUNABLES': '', 'RESNET_JAX_CPU_KERNELS': '', **env}
  lines = [line for line in helpers.run_py(*args, prelude=NO_RUN, env=env).stdout.splitlines()
           if line.startswith('TUNABLES')]
  assert lines == (['TUNABLES ', 'TUNABLES glibc.malloc.hugetlb=1'] if restarts
                   else ['TUNABLES '])


def _thp_enabled():
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[never]' not in f.read()
  except OSError:
    return False


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or not _thp_enabled(),
                    reason='needs glibc and transparent huge pages (madvise or always)')
def test_huge_pages_cut_the_page_faults_of_big_short_lived_buffers():
  """What XLA:CPU does every step: malloc a big buffer, write it, free it."""
  code = ('import ctypes, resource\n'
          'libc = ctypes.CDLL(None)\n'
          'libc.malloc.restype = ctypes.c_void_p\n'
          'libc.free.argtypes = [ctypes.c_void_p]\n'
          'size = 64 << 20\n'
          'before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
          'for _ in range(5):\n'
          '  p = libc.malloc(size)\n'
          '  ctypes.memset(p, 1, size)\n'
          '  libc.free(p)\n'
          'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n')
  default = int(_run(code, 'glibc.malloc.hugetlb=0')[0])
  huge = int(_run(code, 'glibc.malloc.hugetlb=1')[0])
  assert default >= 5 * (64 << 20) // 4096  # every 4 KiB page of every buffer, every time
  assert huge * 5 < default  # 30x fewer on the development machine
