"""The networks of He et al. 2015 (arXiv:1512.03385) as pure Flax linen modules.

Every named network is a `functools.partial` of one of two modules (`ResNet`,
`VGG`), so adding a depth is one line in `_REGISTRY`. The traced program
depends only on a module's fields: nothing here reads the backend, the host
or its cores. The one hook for backend-specific speed work is
`conv_general_dilated` (lax's by default), which a trainer may replace with
the same convolution computed by other kernels (resnet_jax/cpu). BN after
every conv is `batch_norm.BatchNorm`. This module imports only jax and flax:
GPU and TPU machines may have nothing else.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import errors
from resnet_jax.batch_norm import BatchNorm

ModuleDef = Any

# He et al. 2015 ("Delving deep into rectifiers") with n = fan-out, as in the paper.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

SHORTCUTS = ('A', 'B', 'C')
BOTTLENECK_STRIDES = ('1x1', '3x3')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), 1, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = self.norm(name='bn2', scale_init=_last_bn_init(self.zero_init_last_bn))(y)
    if self.shortcut is not None:
      y = y + Shortcut(self.filters, self.strides, self.shortcut, self.conv, self.norm,
                       name='shortcut')(x)
    return nn.relu(y)


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
  def __call__(self, x: jax.Array) -> jax.Array:
    stride_1x1, stride_3x3 = ((self.strides, 1) if self.bottleneck_stride == '1x1'
                              else (1, self.strides))
    y = self.conv(self.filters, (1, 1), stride_1x1, padding='VALID', name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), stride_3x3, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.filters * 4, (1, 1), 1, padding='VALID', name='conv3')(y)
    y = self.norm(name='bn3', scale_init=_last_bn_init(self.zero_init_last_bn))(y)
    if self.shortcut is not None:
      y = y + Shortcut(self.filters * 4, self.strides, self.shortcut, self.conv, self.norm,
                       name='shortcut')(x)
    return nn.relu(y)


def batch_norm(net: nn.Module, train: bool) -> ModuleDef:
  """The BatchNorm of a network, configured from its bn_* fields and dtype."""
  return functools.partial(BatchNorm, use_running_average=not train, momentum=net.bn_momentum,
                           epsilon=net.bn_epsilon, group_size=net.bn_group_size,
                           axis_name=net.bn_axis_name, dtype=net.dtype,
                           fast_variance=net.bn_fast_variance)


def conv_layer(net: nn.Module) -> ModuleDef:
  """The paper's conv layer: no bias (BN follows), He fan-out init, float32 parameters."""
  return functools.partial(nn.Conv, use_bias=False, dtype=net.dtype, param_dtype=jnp.float32,
                           kernel_init=conv_kernel_init,
                           conv_general_dilated=net.conv_general_dilated)


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
  # BN variance in one pass, E[x^2] - E[x]^2 (one read of the activations and one
  # collective fewer; trainers turn it on where BN is memory bound), or two (exact).
  bn_fast_variance: bool = False
  # The convolution of every conv layer (see `conv_layer`): lax's, or the same
  # function on other kernels.
  conv_general_dilated: Callable[..., jax.Array] = jax.lax.conv_general_dilated

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True,
               valid: jax.Array | None = None) -> jax.Array:
    """Logits of images x (batch, H, W, 3).

    `valid` (batch, H, W), for the fully-convolutional testing of the paper's
    Sec. 3.4: images of other sizes at the top left of one canvas. Every conv
    and pool then reads zeros outside the image, as the padding of a network
    run on the image alone, and the global average pool covers the image's
    positions only: each image's logits are those of the image alone.
    """
    conv = conv_layer(self)
    norm = batch_norm(self, train)
    keep = lambda y: y
    if valid is not None:
      keep = lambda y: y * _on_image(valid, y)
      conv = _reading_the_image_only(conv, keep)
    x = x.astype(self.dtype)
    stem_bn = norm(name='stem_bn')
    if self.stem == 'imagenet':
      x = conv(self.widths[0], (7, 7), 2, padding=((3, 3), (3, 3)), name='stem_conv')(x)
      x = nn.relu(stem_bn(x))
      x = nn.max_pool(keep(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.widths[0], (3, 3), 1, padding=((1, 1), (1, 1)), name='stem_conv')(x)
      x = nn.relu(stem_bn(x))
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
            name=f'stage{i + 1}_block{j + 1}')(x)
    if valid is None:
      x = jnp.mean(x, axis=(1, 2))
    else:
      on_image = _on_image(valid, x)
      x = jnp.sum(x * on_image, axis=(1, 2)) / jnp.maximum(jnp.sum(on_image, axis=(1, 2)), 1)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


def _on_image(valid: jax.Array, x: jax.Array) -> jax.Array:
  """(batch, h, w, 1): 1 where x (batch, h, w, C), a map of the net, holds a position that
  the net run on the image alone computes. The image sits at the top left of the canvas
  and every stride-s layer keeps positions 0, s, 2s, ...: those are valid[::step]."""
  step_h, step_w = -(-valid.shape[1] // x.shape[1]), -(-valid.shape[2] // x.shape[2])
  return valid[:, ::step_h, ::step_w, None].astype(x.dtype)


def _reading_the_image_only(conv: ModuleDef, keep: Callable) -> ModuleDef:
  """`conv` whose layers zero their input outside the image first (same parameters)."""
  def make(*args, **kwargs):
    layer = conv(*args, **kwargs)
    return lambda x: layer(keep(x))
  return make


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
  bn_fast_variance: bool = False  # see ResNet
  conv_general_dilated: Callable[..., jax.Array] = jax.lax.conv_general_dilated  # see ResNet

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = x.astype(self.dtype)
    norm = batch_norm(self, train)
    conv = functools.partial(conv_layer(self), use_bias=True)  # VGG's convs keep their biases
    for i, (num_convs, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_convs):
        x = conv(width, (3, 3), 1, padding=((1, 1), (1, 1)), name=f'stage{i + 1}_conv{j + 1}')(x)
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
    'conv_general_dilated': None,
}


def model_options(name: str) -> dict[str, tuple | None]:
  """The options `create_model` accepts for `name`, with their valid values."""
  _check_name(name)
  if name == 'vgg19':
    return {**_COMMON_OPTIONS, 'batch_norm': None}
  options = {**_COMMON_OPTIONS, 'zero_init_last_bn': None}
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
  """`create_model` from a config section ({'name': ..., option: value or None, ...}) and
  `extra` options, which take precedence (e.g. what a trainer chose for the backend)."""
  options = dict(model_config)
  name = options.pop('name')
  return create_model(name, num_classes, **{**options, **extra})
