"""What the trainer decides once per run from the backend, outside the model.

- BN's one-pass variance (`bn_fast_variance`) where the config leaves it
  unset: on GPUs and TPUs, where BN is memory bound; two passes (exact) on CPUs.
- The CPU plugin (resnet_jax/cpu, `config.cpu_kernels`): faster kernels for
  the same convolutions on XLA:CPU. It is imported only when enabled, checked
  before any trace, and every host of a run uses process 0's choice.

Only jax here: benchmarks on GPU machines import this module without TensorFlow.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from resnet_jax import errors

CPU_KERNEL_MODES = ('auto', 'on', 'off')
# Replaces config.cpu_kernels='auto' (the default) when set: e.g. off for a test run.
CPU_KERNELS_ENV = 'RESNET_JAX_CPU_KERNELS'
# JAX plugins whose presence means this host has accelerators (no CPU re-exec there).
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')


@dataclasses.dataclass(frozen=True)
class Choice:
  """The model options the trainer adds, and a line for logs and config.json."""
  model_options: dict[str, Any]
  description: str


def cpu_kernel_mode(configured: str) -> str:
  """config.cpu_kernels, with RESNET_JAX_CPU_KERNELS in place of 'auto'."""
  mode = configured
  if mode == 'auto':
    mode = os.environ.get(CPU_KERNELS_ENV, 'auto') or 'auto'
  if mode not in CPU_KERNEL_MODES:
    source = f'${CPU_KERNELS_ENV}' if configured == 'auto' else 'config.cpu_kernels'
    raise errors.ConfigError(f'{source}={mode!r}; choose one of {", ".join(CPU_KERNEL_MODES)}.')
  return mode


def likely_cpu_only() -> bool:
  """Whether this host runs JAX on its CPU: no accelerator plugin, no JAX_PLATFORMS asking for one.

  Cheap (no jax import): run.py asks it before restarting itself with the
  plugin's malloc setting.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def model_defaults(config_model: Any, backend: str | None = None) -> dict[str, Any]:
  """Model options left unset in the config that depend on the backend."""
  backend = backend or jax.default_backend()
  if config_model.get('bn_fast_variance') is None:
    # One pass where BN is memory bound (docs/performance.md: the H200 figures).
    return {'bn_fast_variance': backend != 'cpu'}
  return {}


def choose_cpu_kernels(configured: str) -> Choice:
  """The CPU plugin's part of the model, decided once for the run (see module docstring).

  'auto': on for the CPU backend where the plugin's checks pass; 'on': the
  same, but a failed check stops the run; 'off': XLA's own kernels. Process 0
  decides (its mode, then what it can run); a host that cannot do what it
  chose stops the run with an error that says which host and why (hosts that
  compiled different programs would wait on each other forever).
  """
  mode = _process_zero_mode(cpu_kernel_mode(configured))
  backend = jax.default_backend()
  if mode == 'off':
    source = f'${CPU_KERNELS_ENV}=off' if configured == 'auto' else 'config.cpu_kernels=off'
    choice = Choice({}, f"off ({source}): XLA's kernels")
  elif backend != 'cpu':
    if mode == 'on':
      raise errors.ConfigError(f'config.cpu_kernels=on needs the CPU backend; this run is on '
                               f'{backend}. Use auto or off.')
    choice = Choice({}, f"off: the {backend} backend's own kernels")
  else:
    from resnet_jax import cpu  # pylint: disable=g-import-not-at-top  (only when enabled)
    chosen = _process_zero_choice(cpu.check())
    if mode == 'on' and not chosen.convolutions:
      raise errors.ConfigError(f'config.cpu_kernels=on, but the CPU plugin cannot run here: '
                               f'{chosen.reason}. Use auto (falls back to XLA) or off.')
    choice = Choice(chosen.model_options(), chosen.describe())
  logging.info('CPU kernels: %s.', choice.description)
  return choice


def _process_zero_mode(mode: str) -> str:
  """Process 0's cpu_kernels mode, which every host follows."""
  if jax.process_count() == 1:
    return mode
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  modes = np.asarray(multihost_utils.process_allgather(
      np.int32(CPU_KERNEL_MODES.index(mode)))).reshape(-1)
  chosen = CPU_KERNEL_MODES[int(modes[0])]
  if chosen != mode:
    logging.warning('config.cpu_kernels: following process 0 (%s; this host: %s).', chosen, mode)
  return chosen


def _process_zero_choice(local: Any) -> Any:
  """Process 0's plugin choice; every host must be able to follow it."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  can = np.array([local.convolutions, local.kernel_gradients], np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(can)).reshape(-1, 2)
  chosen = everyone[0]
  unable = [i for i, row in enumerate(everyone) if (row < chosen).any()]
  if unable:
    what = 'oneDNN convolutions' + (' and kernel gradients' if chosen[1] else '')
    here = f' (here: {local.reason})' if jax.process_index() in unable else ''
    raise errors.ConfigError(
        f'Process 0 chose {what} (config.cpu_kernels), but process(es) {unable} cannot run '
        f'them{here}. Make the hosts alike (g++ and the `cpu` extra on each) or set '
        'config.cpu_kernels=off.')
  return local.restricted_to(bool(chosen[0]), bool(chosen[1]))

