"""Batch normalisation as the paper trained with it: whole-batch or per-group ("ghost")
statistics, synchronised over a device axis, running statistics every replica agrees on.

Pure Flax and lax, like the networks that use it (models.py).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import errors


class BatchNorm(nn.Module):
  """Batch normalisation whose statistics may come from fixed-size groups.

  `group_size=0` normalises with the statistics of the whole batch: across all
  devices when `axis_name` names the pmap axis, and across the global batch of
  a sharded jit step. `group_size=g` normalises each run of g consecutive
  examples with its own statistics ("ghost" BN). This is what the paper's
  multi-GPU training did (32 images per GPU on ImageNet, 64 on CIFAR), so a jit
  step over a global batch can reproduce it exactly. The running statistics
  average the groups' statistics (and the devices' ones, over `axis_name`), so
  every replica holds the same running statistics in either mode.
  `fast_variance` computes the variance as E[x^2] - E[x]^2 in one pass (and
  one collective) instead of E[(x - E[x])^2] in two.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_size: int = 0
  axis_name: str | None = None
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  fast_variance: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

    if self.use_running_average:
      mul = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
      return (x * mul.astype(x.dtype) + (bias - running_mean.value * mul).astype(x.dtype)).astype(self.dtype)

    groups = x.astype(jnp.float32)
    if self.group_size:
      if x.shape[0] % self.group_size:
        raise errors.ConfigError(
            f'BatchNorm group size {self.group_size} does not divide the batch of '
            f'{x.shape[0]} examples (per device under pmap): choose a batch size '
            'that is a multiple of model.bn_group_size, or set it to 0.')
      groups = groups.reshape((-1, self.group_size) + x.shape[1:])
    else:
      groups = groups[None]
    reduce_axes = tuple(range(1, groups.ndim - 1))
    # Collectives only where a named axis is bound (not at init).
    sync = self.axis_name is not None and not self.is_initializing()
    sync_normalisation = sync and not self.group_size

    mean = groups.mean(reduce_axes, keepdims=True)
    if self.fast_variance:
      # One pass over x (and one collective): E[x^2] - E[x]^2, in float32.
      mean_sq = jnp.square(groups).mean(reduce_axes, keepdims=True)
      if sync_normalisation:
        mean, mean_sq = jax.lax.pmean(jnp.stack([mean, mean_sq]), self.axis_name)
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    else:
      # Two passes: exact for activations with a large mean, one more read of x.
      if sync_normalisation:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.square(groups - mean).mean(reduce_axes, keepdims=True)
      if sync_normalisation:
        var = jax.lax.pmean(var, self.axis_name)

    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (groups - mean) * mul + bias

    if not self.is_initializing():
      batch_mean = mean.reshape(-1, features).mean(0)
      batch_var = var.reshape(-1, features).mean(0)
      if sync and self.group_size:
        batch_mean, batch_var = jax.lax.pmean(jnp.stack([batch_mean, batch_var]), self.axis_name)
      m = self.momentum
      running_mean.value = m * running_mean.value + (1 - m) * batch_mean
      running_var.value = m * running_var.value + (1 - m) * batch_var
    return y.reshape(x.shape).astype(self.dtype)
