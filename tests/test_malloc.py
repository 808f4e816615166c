"""The start-up malloc setting (resnet_jax/malloc.py): how it is set, and that it works."""
import os
import platform
import subprocess
import sys

import pytest

from resnet_jax import malloc
from tests import helpers

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
  code = (SHOW.format('start') + '\nimport sys\nfrom resnet_jax import malloc\n'
          'malloc.reexec_with_huge_pages()\n' + SHOW.format('end') + '\nprint(sys.argv[1:])')
  assert _run(code, '') == ['start ', 'start glibc.malloc.hugetlb=1',
                            'end glibc.malloc.hugetlb=1', "['an-argument']"]
  assert _run(code, 'glibc.malloc.hugetlb=0') == [
      'start glibc.malloc.hugetlb=0', 'end glibc.malloc.hugetlb=0', "['an-argument']"]


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_run_py_restarts_with_the_tunable():
  out = helpers.run_py('--mode=describe', prelude=SHOW.format('TUNABLES'),
                       env={'GLIBC_TUNABLES': ''})
  assert 'TUNABLES glibc.malloc.hugetlb=1' in out.stdout.splitlines()


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
