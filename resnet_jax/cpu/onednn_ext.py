"""Builds and loads resnet_jax's C++ XLA FFI extension (csrc/), which calls oneDNN.

The extension is compiled on first use with the system's C++ compiler (`$CXX`,
else g++) against jaxlib's FFI headers and the oneDNN of the pip packages
`onednn-cpu-gomp` and `onednn-devel-cpu-gomp` (the `cpu` extra: pip install
'resnet-jax[cpu]', x86-64 Linux), and cached under `$RESNET_JAX_CACHE` (default
`~/.cache/resnet_jax`), keyed by a hash of the source, the jaxlib version, the
oneDNN library and the command; processes that build it at the same time each
write their own file and rename it into place. `load()` raises
`ExtensionError` saying what is missing; callers fall back to XLA's kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile

SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'onednn_kernel_grad.cc'
ONEDNN = 'onednn-cpu-gomp'
ONEDNN_HEADERS = 'onednn-devel-cpu-gomp'
ONEDNN_VERSION = '2023.2.0'


class ExtensionError(RuntimeError):
  """The extension cannot be built or loaded here (the message says why)."""


def _package_file(distribution: str, suffix: str) -> pathlib.Path:
  """An installed file of a pip distribution, by the end of its path."""
  try:
    files = importlib.metadata.files(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    raise ExtensionError(f'the pip package {distribution} is not installed '
                         f"(pip install -e '.[cpu]' in resnet_jax's checkout, or pip install "
                         f'{distribution}=={ONEDNN_VERSION})') from None
  for f in files:
    if str(f).endswith(suffix):
      path = pathlib.Path(f.locate()).resolve()
      if path.exists():
        return path
  raise ExtensionError(f'{distribution} has no {suffix}; reinstall it')


def _cache_dir() -> pathlib.Path:
  root = os.environ.get('RESNET_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'resnet_jax')
  return pathlib.Path(root)


def build() -> pathlib.Path:
  """The compiled extension's path, compiling it if the cache lacks it."""
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  library = _package_file(ONEDNN, '/libdnnl.so.3')
  include = _package_file(ONEDNN_HEADERS, '/oneapi/dnnl/dnnl.hpp').parents[2]
  compiler = os.environ.get('CXX') or 'g++'
  if shutil.which(shlex.split(compiler)[0]) is None:
    raise ExtensionError(f'no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)')
  command = shlex.split(compiler) + [
      '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp',
      '-Wno-attributes', '-Wno-return-type',
      f'-I{jax.ffi.include_dir()}', f'-I{include}', str(SOURCE),
      f'-L{library.parent}', f'-l:{library.name}', f'-Wl,-rpath,{library.parent}']
  key = hashlib.sha256('\0'.join(
      [SOURCE.read_text(), jaxlib.__version__, str(library), str(library.stat().st_size)]
      + command).encode()).hexdigest()[:16]
  target = _cache_dir() / f'onednn_kernel_grad-{key}.so'
  if target.exists():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix='.building-', suffix='.so', dir=target.parent)
  except OSError as e:
    raise ExtensionError(f'cannot write the extension to {target.parent} ({e}); '
                         'set RESNET_JAX_CACHE to a writable directory') from None
  os.close(fd)
  try:
    out = subprocess.run(command + ['-o', partial], capture_output=True, text=True,
                         check=False, timeout=600)
    if out.returncode:
      raise ExtensionError(f'compiling {SOURCE.name} failed ({shlex.join(command)}):\n'
                           f'{out.stderr[-2000:]}')
    os.replace(partial, target)  # atomic: a concurrent build wrote the same bytes
  except subprocess.TimeoutExpired:
    raise ExtensionError(f'compiling {SOURCE.name} took over 10 minutes') from None
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


@functools.cache
def load() -> ctypes.CDLL:
  """The extension, built if needed and loaded into this process (once)."""
  path = build()
  try:
    return ctypes.CDLL(str(path))
  except OSError as e:
    raise ExtensionError(f'cannot load {path}: {e}') from None
