"""The networks of He et al. 2015 (arXiv:1512.03385) as pure Flax linen modules.

Every named network is a `functools.partial` of one of two modules (`ResNet`,
`VGG`), so adding a depth is one line in `_REGISTRY`. This module imports only
jax and flax: GPU and TPU benchmark machines may have nothing else.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import errors
from resnet_jax import onednn_conv

ModuleDef = Any

# He et al. 2015 ("Delving deep into rectifiers") with n = fan-out, as in the paper.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

SHORTCUTS = ('A', 'B', 'C')
BOTTLENECK_STRIDES = ('1x1', '3x3')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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


@jax.custom_vjp
def store(x: jax.Array, flag: jax.Array) -> jax.Array:
  """Returns x exactly, written to memory once: the output of a `lax.cond`.

  Why: XLA:CPU fuses elementwise producers (BN, the residual addition, ReLU)
  into each of their consumers and recomputes them there. Left alone, it
  recomputes every earlier block of a stage inside the transposes that feed
  the weight gradients (cost quadratic in depth), and a transpose fused with
  anything else runs ~3x slower than a pure one. Nothing fuses across a
  conditional, so its output is computed once and each consumer reads it.
  `flag` must be true at run time but unknown to the compiler (a constant
  would be folded away); both branches return x, so its value never matters.
  It should be replicated (from a parameter): one derived from sharded
  activations would cost a collective per call. The gradient passes straight
  through (a conditional there too would only add copies).
  """
  return jax.lax.cond(flag, lambda v: v, lambda v: v * 1, x)


def _store_fwd(x: jax.Array, flag: jax.Array) -> tuple[jax.Array, None]:
  return store(x, flag), None


def _store_bwd(_, g: jax.Array) -> tuple[jax.Array, None]:
  return g, None


store.defvjp(_store_fwd, _store_bwd)


def _maybe_store(x: jax.Array, flag: jax.Array | None) -> jax.Array:
  return x if flag is None else store(x, flag)


# XLA:CPU's fast (YNNPACK) convolution kernels take a convolution only when it
# has more than 16 input or output features; narrower ones run on its Eigen path.
YNN_MIN_FEATURES = 17
# What 16 input features are padded to. Measured for a 3x3 conv at 32x32 on
# AVX-512: 17 or 18 features are slower than the Eigen path, 20 is fastest, 24 slower.
NARROW_CONV_PADDED_FEATURES = 20


def narrow_conv_padded(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                       padding: Any, *args: Any, **kwargs: Any) -> jax.Array:
  """`lax.conv_general_dilated` that pads 16 channels-last input features to 20.

  Why: XLA:CPU runs a conv with 16 input and at most 16 output features (CIFAR
  stage 1) at half the speed of its YNNPACK kernels, which decline it. Zero
  features add exact zeros to every sum, so padding the input to 20 features
  gives the same convolution (up to float32 summation order) from YNNPACK, and
  its input gradient (16 -> 20 features, the extra 4 dropped) too. The tangent
  rule keeps the kernel's term unpadded, so the kernel gradient (its transpose)
  stays in the unpadded form, which is already on YNNPACK. Any other conv,
  channels-first ones and bfloat16 ones (YNNPACK convs are float32 only) pass
  through unchanged.
  """
  def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, window_strides, padding, *args, **kwargs)

  dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                         kwargs.get('dimension_numbers'))
  channels_last = (dims.lhs_spec[1] == lhs.ndim - 1 and dims.rhs_spec[:2] == (rhs.ndim - 1,
                                                                              rhs.ndim - 2))
  features, out_features = rhs.shape[-2:]
  if (not channels_last or features != YNN_MIN_FEATURES - 1
      or out_features >= YNN_MIN_FEATURES or kwargs.get('feature_group_count', 1) != 1
      or kwargs.get('batch_group_count', 1) != 1 or lhs.dtype != jnp.float32):
    return conv(lhs, rhs)
  extra = NARROW_CONV_PADDED_FEATURES - features

  def padded(x: jax.Array, w: jax.Array) -> jax.Array:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
    w = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, extra), (0, 0)])
    return conv(x, w)

  @jax.custom_jvp
  def padded_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return padded(x, w)

  @padded_conv.defjvp
  def _(primals: tuple[jax.Array, jax.Array],
        tangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x, w), (dx, dw) = primals, tangents
    # Bilinear: the input's term padded, the kernel's unpadded (see above).
    return padded(x, w), padded(dx, w) + conv(x, dw)

  return padded_conv(lhs, rhs)


def cpu_cores() -> int:
  """CPU cores this process may use (what taskset allows, where the OS says)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def cpu_cores_per_device() -> float:
  """CPU cores this process may use per local XLA device."""
  return cpu_cores() / jax.local_device_count()


def pad_narrow_convs_by_default() -> bool:
  """Whether `narrow_conv_padded` pays here: on CPUs with at most one core per device.

  Measured on ResNet-20 (2-core AVX-512 machine, benchmarks/compare_options.py):
  one device pinned to one core 537 -> 511 ms of ops per step, 2 devices
  422 -> 444 img/s, 4 devices 389 -> 417; but one device on both cores
  306 -> 287, as XLA spreads an Eigen-path conv over both cores and a YNNPACK
  one less well. CPU quotas (cgroups) are not seen here, nor by XLA.
  """
  return jax.default_backend() == 'cpu' and cpu_cores_per_device() <= 1


def subsample_and_pad(x: jax.Array, out_channels: int, strides: int) -> jax.Array:
  """Option A shortcut: take every `strides`-th pixel and zero-pad new channels."""
  x = x[:, ::strides, ::strides, :]
  extra = out_channels - x.shape[-1]
  if extra < 0:
    raise ValueError(f'option A cannot reduce channels ({x.shape[-1]} -> {out_channels})')
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))


class Shortcut(nn.Module):
  """The block's identity path: identity, or option A, B or C where it applies.

  A: parameter-free where the shape changes. B: 1x1 projection + BN where the
  shape changes, identity elsewhere. C: projection on every block.
  """
  out_channels: int
  strides: int
  option: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    changes_shape = self.strides != 1 or x.shape[-1] != self.out_channels
    if self.option == 'C' or (self.option == 'B' and changes_shape):
      y = self.conv(self.out_channels, (1, 1), self.strides, padding='VALID', name='conv')(x)
      return self.norm(name='bn')(y)
    if changes_shape:
      return subsample_and_pad(x, self.out_channels, self.strides)
    return x


class BasicBlock(nn.Module):
  """Two 3x3 convs (paper Fig. 5 left); `shortcut=None` gives the plain block."""
  filters: int
  strides: int
  shortcut: str | None
  conv: ModuleDef
  norm: ModuleDef
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, store_flag: jax.Array | None = None) -> jax.Array:
    """`store_flag` (see `store`) writes the activations that feed convs to memory."""
    y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)), name='conv1')(x)
    y = _maybe_store(nn.relu(self.norm(name='bn1')(y)), store_flag)
    y = self.conv(self.filters, (3, 3), 1, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = self.norm(name='bn2', scale_init=_last_bn_init(self.zero_init_last_bn))(y)
    if self.shortcut is not None:
      y = y + Shortcut(self.filters, self.strides, self.shortcut, self.conv, self.norm,
                       name='shortcut')(x)
    return _maybe_store(nn.relu(y), store_flag)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand by 4 (paper Fig. 5 right).

  The paper (v1) strides the first 1x1 conv; `bottleneck_stride='3x3'` strides
  the 3x3 conv instead (the "v1.5" variant of later reproductions).
  """
  filters: int
  strides: int
  shortcut: str | None
  conv: ModuleDef
  norm: ModuleDef
  zero_init_last_bn: bool = False
  bottleneck_stride: str = '1x1'

  @nn.compact
  def __call__(self, x: jax.Array, store_flag: jax.Array | None = None) -> jax.Array:
    """`store_flag` (see `store`) writes the activations that feed convs to memory."""
    stride_1x1, stride_3x3 = ((self.strides, 1) if self.bottleneck_stride == '1x1'
                              else (1, self.strides))
    y = self.conv(self.filters, (1, 1), stride_1x1, padding='VALID', name='conv1')(x)
    y = _maybe_store(nn.relu(self.norm(name='bn1')(y)), store_flag)
    y = self.conv(self.filters, (3, 3), stride_3x3, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = _maybe_store(nn.relu(self.norm(name='bn2')(y)), store_flag)
    y = self.conv(self.filters * 4, (1, 1), 1, padding='VALID', name='conv3')(y)
    y = self.norm(name='bn3', scale_init=_last_bn_init(self.zero_init_last_bn))(y)
    if self.shortcut is not None:
      y = y + Shortcut(self.filters * 4, self.strides, self.shortcut, self.conv, self.norm,
                       name='shortcut')(x)
    return _maybe_store(nn.relu(y), store_flag)


def batch_norm(net: nn.Module, train: bool) -> ModuleDef:
  """The BatchNorm of a network, configured from its bn_* fields and dtype.

  `bn_fast_variance=None` means one pass on accelerators, where BN is memory
  bound (ResNet-50 bf16 on an H200: 6,555 -> 7,017 img/s), and two passes on
  CPUs, where it made no difference.
  """
  fast_variance = net.bn_fast_variance
  if fast_variance is None:
    fast_variance = jax.default_backend() != 'cpu'
  return functools.partial(BatchNorm, use_running_average=not train, momentum=net.bn_momentum,
                           epsilon=net.bn_epsilon, group_size=net.bn_group_size,
                           axis_name=net.bn_axis_name, dtype=net.dtype,
                           fast_variance=fast_variance)


def _last_bn_init(zero: bool) -> Callable:
  return nn.initializers.zeros if zero else nn.initializers.ones


class ResNet(nn.Module):
  """Residual (or, with `residual=False`, plain) network of the paper.

  `stem='cifar'`: one 3x3 conv (paper Sec. 4.2). `stem='imagenet'`: 7x7/2 conv
  and 3x3/2 max pool (Table 1). Every stage after the first halves the maps
  with a stride-2 conv; BN follows every conv; global average pool and a
  dense classifier end the net.
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block_cls: ModuleDef
  stem: str
  num_classes: int = 1000
  residual: bool = True
  shortcut: str = 'B'
  bottleneck_stride: str = '1x1'
  zero_init_last_bn: bool = False
  dtype: Any = jnp.float32
  bn_group_size: int = 0
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_fast_variance: bool | None = None  # None: one pass off CPUs (see `batch_norm`)
  # Store the activations that feed convs (see `store`); None: on the CPU backend only.
  materialize_blocks: bool | None = None
  # Pad 16-feature conv inputs to 20 (see `narrow_conv_padded`); None: on CPUs with
  # at most one core per XLA device (see `pad_narrow_convs_by_default`).
  pad_narrow_convs: bool | None = None
  # Run convolutions on oneDNN's kernels (see resnet_jax/onednn_conv.py); None: on
  # the CPU backend where its check passes (`onednn_conv.problem`). When on,
  # pad_narrow_convs has no effect (oneDNN has no 16-feature slow path).
  onednn_convs: bool | None = None
  # With onednn_convs: kernel gradients on oneDNN too (resnet_jax's C++ extension,
  # resnet_jax/onednn_ext.py); None: where it builds and its check passes
  # (`onednn_conv.kernel_gradient_problem`).
  onednn_kernel_grads: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    on_cpu = jax.default_backend() == 'cpu'
    materialize = on_cpu if self.materialize_blocks is None else self.materialize_blocks
    onednn = self.onednn_convs
    if onednn is None:
      onednn = on_cpu and onednn_conv.available()
    elif onednn and on_cpu and not onednn_conv.available():
      raise RuntimeError(f'model.onednn_convs=True, but this jaxlib cannot run oneDNN '
                         f'convolutions ({onednn_conv.problem()}); set it to False or leave '
                         f'it unset (then used only where it works).')
    if onednn:
      kernel_grads = self.onednn_kernel_grads
      if kernel_grads is None:
        kernel_grads = on_cpu and onednn_conv.kernel_gradient_problem() is None
      elif kernel_grads and on_cpu and onednn_conv.kernel_gradient_problem():
        raise RuntimeError(f'model.onednn_kernel_grads=True, but they cannot run here '
                           f'({onednn_conv.kernel_gradient_problem()}); set it to False or '
                           f'leave it unset (then used only where they work).')
      conv_fn = functools.partial(onednn_conv.conv_general_dilated, kernel_grads=kernel_grads)
    else:
      pad_narrow = (pad_narrow_convs_by_default() if self.pad_narrow_convs is None
                    else self.pad_narrow_convs)
      conv_fn = narrow_conv_padded if pad_narrow else None
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=conv_kernel_init,
                             conv_general_dilated=conv_fn)
    norm = batch_norm(self, train)
    x = x.astype(self.dtype)
    stem_bn = norm(name='stem_bn')
    if self.stem == 'imagenet':
      x = conv(self.widths[0], (7, 7), 2, padding=((3, 3), (3, 3)), name='stem_conv')(x)
      x = nn.relu(stem_bn(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.widths[0], (3, 3), 1, padding=((1, 1), (1, 1)), name='stem_conv')(x)
      x = nn.relu(stem_bn(x))
    # True at run time, from a replicated parameter (see `store`).
    flag = jnp.isfinite(stem_bn.variables['params']['scale'][0]) if materialize else None
    x = _maybe_store(x, flag)
    block_cls = self.block_cls
    if block_cls is BottleneckBlock:
      block_cls = functools.partial(block_cls, bottleneck_stride=self.bottleneck_stride)
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        x = block_cls(
            filters=width,
            strides=2 if i > 0 and j == 0 else 1,
            shortcut=self.shortcut if self.residual else None,
            conv=conv, norm=norm,
            zero_init_last_bn=self.zero_init_last_bn,
            name=f'stage{i + 1}_block{j + 1}')(x, flag)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


class VGG(nn.Module):
  """VGG-19, the paper's reference (Fig. 3 left): 16 3x3 convs in five stages,
  each closed by a 2x2 max pool, then dense 4096, 4096 and the classifier.

  With `batch_norm=True` a BN follows every conv (conv biases kept, as in the
  common reference implementation whose parameter counts we match).
  """
  stage_sizes: Sequence[int] = (2, 2, 4, 4, 4)
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  num_classes: int = 1000
  batch_norm: bool = False
  dtype: Any = jnp.float32
  bn_group_size: int = 0
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_fast_variance: bool | None = None  # None: one pass off CPUs (see `batch_norm`)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = x.astype(self.dtype)
    norm = batch_norm(self, train)
    for i, (num_convs, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_convs):
        x = nn.Conv(width, (3, 3), 1, padding=((1, 1), (1, 1)), dtype=self.dtype,
                      param_dtype=jnp.float32, kernel_init=conv_kernel_init,
                      name=f'stage{i + 1}_conv{j + 1}')(x)
        if self.batch_norm:
          x = norm(name=f'stage{i + 1}_bn{j + 1}')(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for k in range(2):
      x = nn.relu(nn.Dense(4096, dtype=self.dtype, param_dtype=jnp.float32, name=f'fc{k + 1}')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


# --- The registry: the one place that lists the paper's depths. ---------------

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_STAGES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (BottleneckBlock, (3, 4, 6, 3)),
    101: (BottleneckBlock, (3, 4, 23, 3)),
    152: (BottleneckBlock, (3, 8, 36, 3)),
}
IMAGENET_PLAIN_DEPTHS = (18, 34)


def _cifar(depth: int, residual: bool) -> Callable[..., nn.Module]:
  n = (depth - 2) // 6
  return functools.partial(ResNet, stage_sizes=(n, n, n), widths=CIFAR_WIDTHS,
                           block_cls=BasicBlock, stem='cifar', residual=residual,
                           shortcut='A')


def _imagenet(depth: int, residual: bool) -> Callable[..., nn.Module]:
  block_cls, stage_sizes = IMAGENET_STAGES[depth]
  return functools.partial(ResNet, stage_sizes=stage_sizes, widths=IMAGENET_WIDTHS,
                           block_cls=block_cls, stem='imagenet', residual=residual,
                           shortcut='B')


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f'resnet{d}': _cifar(d, True) for d in CIFAR_RESNET_DEPTHS},
    **{f'plain{d}': _cifar(d, False) for d in CIFAR_PLAIN_DEPTHS},
    **{f'resnet{d}': _imagenet(d, True) for d in IMAGENET_STAGES},
    **{f'plain{d}': _imagenet(d, False) for d in IMAGENET_PLAIN_DEPTHS},
    'vgg19': VGG,
}
MODEL_NAMES = tuple(_REGISTRY)

# Options a caller may set, with their valid values (None: any value of the type).
_COMMON_OPTIONS = {
    'dtype': tuple(DTYPES),
    'bn_group_size': None,
    'bn_axis_name': None,
    'bn_momentum': None,
    'bn_epsilon': None,
    'bn_fast_variance': None,
}


def model_options(name: str) -> dict[str, tuple | None]:
  """The options `create_model` accepts for `name`, with their valid values."""
  _check_name(name)
  if name == 'vgg19':
    return {**_COMMON_OPTIONS, 'batch_norm': None}
  options = {**_COMMON_OPTIONS, 'zero_init_last_bn': None, 'materialize_blocks': None,
             'pad_narrow_convs': None, 'onednn_convs': None, 'onednn_kernel_grads': None}
  if name.startswith('resnet'):
    options['shortcut'] = SHORTCUTS
  if _REGISTRY[name].keywords.get('block_cls') is BottleneckBlock:
    options['bottleneck_stride'] = BOTTLENECK_STRIDES
  return options


def _check_name(name: str) -> None:
  if name not in _REGISTRY:
    raise errors.ConfigError(f'Unknown model {name!r}. Valid names: {", ".join(MODEL_NAMES)}.')


def create_model(name: str, num_classes: int, **options: Any) -> nn.Module:
  """Builds a registered network by name.

  Options set to None take the family's default (for example option A
  shortcuts on CIFAR nets and option B on ImageNet nets).
  """
  if num_classes < 1:
    raise errors.ConfigError(f'num_classes must be positive, got {num_classes}.')
  options = check_options(name, options)
  return _REGISTRY[name](num_classes=num_classes, **options)


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
  """The options that are set, validated for `name` (errors list the valid choices)."""
  valid = model_options(name)
  options = {k: v for k, v in options.items() if v is not None}
  for key, value in options.items():
    if key not in valid:
      raise errors.ConfigError(f'Option {key!r} does not apply to {name}. Valid options: '
                       f'{", ".join(sorted(valid))}.')
    choices = valid[key]
    if choices is not None and value not in choices:
      raise errors.ConfigError(f'{key}={value!r} is not valid for {name}. Choose one of: '
                       f'{", ".join(map(str, choices))}.')
  if 'dtype' in options:
    options['dtype'] = DTYPES[options['dtype']]
  if options.get('bn_group_size', 0) < 0:
    raise errors.ConfigError(f'bn_group_size must be >= 0 (0: whole batch), got {options["bn_group_size"]}.')
  return options


def create_model_from_config(model_config: Any, num_classes: int, **extra: Any) -> nn.Module:
  """`create_model` from a config section: {'name': ..., option: value or None, ...}."""
  options = dict(model_config)
  name = options.pop('name')
  return create_model(name, num_classes, **options, **extra)
