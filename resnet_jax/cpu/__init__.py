"""The CPU plugin: faster XLA:CPU kernels for the same convolutions, opt-in.

Nothing imports this package unless `config.cpu_kernels` enables it; the
trainer (resnet_jax/backend.py) asks `check()` once, before any trace, and
hands `Kernels.model_options()` to the model, whose only hook is its
`conv_general_dilated`. The math is lax's; only the kernels differ:

- `onednn_conv`: convolutions and stride-1 input gradients on the oneDNN
  kernels that jaxlib's XLA:CPU links (its internal `__onednn$convolution`
  call, validated for jaxlib 0.10 only); kernel gradients on oneDNN's
  backward-weights primitive through resnet_jax's own C++ extension
  (`onednn_ext`, compiled on first use with g++ against the oneDNN of the
  `cpu` extra: pip install 'resnet-jax[cpu]').
- `malloc`: run.py's restart with huge-page malloc (fewer page faults per step).

Where a part cannot work (another jaxlib, no compiler, no oneDNN package, not
x86-64) it says why and XLA's kernels do the job. docs/performance.md has the
measurements.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Which oneDNN kernels the model's convolutions use, and why not more."""
  convolutions: bool
  kernel_gradients: bool
  reason: str = ''

  def restricted_to(self, convolutions: bool, kernel_gradients: bool) -> Kernels:
    return Kernels(self.convolutions and convolutions,
                   self.kernel_gradients and kernel_gradients and convolutions,
                   self.reason or 'process 0 chose less')

  def model_options(self) -> dict[str, Any]:
    if not self.convolutions:
      return {}
    from resnet_jax.cpu import onednn_conv  # pylint: disable=g-import-not-at-top
    return {'conv_general_dilated': functools.partial(
        onednn_conv.conv_general_dilated, kernel_grads=self.kernel_gradients)}

  def describe(self) -> str:
    if not self.convolutions:
      return f"XLA's (the CPU plugin cannot run here: {self.reason})"
    if not self.kernel_gradients:
      return ("oneDNN convolutions and input gradients; XLA's kernel gradients "
              f'({self.reason})')
    return 'oneDNN convolutions, input and kernel gradients (resnet_jax/cpu)'


def check(kernel_gradients: bool = True) -> Kernels:
  """What works on this process's CPU, tried now (this builds the C++ extension)."""
  try:  # it uses jax internals, which other jax versions may lack
    from resnet_jax.cpu import onednn_conv  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return Kernels(False, False, f'resnet_jax.cpu.onednn_conv does not import with this jax '
                                 f'({type(e).__name__}: {e})')
  reason = onednn_conv.problem()
  if reason:
    return Kernels(False, False, reason)
  if not kernel_gradients:
    return Kernels(True, False, 'kernel gradients turned off')
  reason = onednn_conv.kernel_gradient_problem()
  return Kernels(True, reason is None, reason or '')
