"""Layer table, parameter count and multiply-adds of a model, without running it.

Everything here works on shapes (`jax.eval_shape`), so describing even
ResNet-1202 or VGG-19 at 224x224 takes a second and no memory.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Layer:
  """One conv or dense layer: where it is, what it computes, what it costs."""
  path: str
  kind: str
  kernel: str
  strides: str
  output_shape: tuple[int, ...]
  params: int
  macs: int  # multiply-adds per image


def _layer(module: nn.Module, x: Any, y: Any) -> Layer | None:
  path = '/'.join(module.path)
  out_elements = math.prod(y.shape[1:])
  if isinstance(module, nn.Conv):
    in_features = x.shape[-1] // module.feature_group_count
    window = math.prod(module.kernel_size)
    params = window * in_features * module.features + (module.features if module.use_bias else 0)
    strides = module.strides if module.strides is not None else 1
    strides = strides if isinstance(strides, int) else strides[0]
    return Layer(path, 'conv', 'x'.join(map(str, module.kernel_size)), str(strides),
                 tuple(y.shape[1:]), params, out_elements * window * in_features)
  if isinstance(module, nn.Dense):
    in_features = x.shape[-1]
    params = in_features * module.features + (module.features if module.use_bias else 0)
    return Layer(path, 'dense', '-', '-', tuple(y.shape[1:]), params, in_features * module.features)
  return None


def layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
  """The conv and dense layers of `model` on one image of `input_shape` (H, W, C)."""
  found: list[Layer] = []

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      layer = _layer(context.module, args[0], y)
      if layer is not None:
        found.append(layer)
    return y

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + tuple(input_shape)),
                                      train=False))
  return found


def variable_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Abstract variables (params and batch_stats) of `model`, computed from shapes only."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + tuple(input_shape)),
                                           train=False))


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or shapes."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def num_trainable_params(model: nn.Module, input_shape: tuple[int, ...]) -> int:
  """Trainable parameters: conv/dense weights and BN scale/bias (not running statistics)."""
  return count_params(variable_shapes(model, input_shape)['params'])


def multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
  """Multiply-adds of the conv and dense layers for one image, as the paper counts FLOPs."""
  return sum(layer.macs for layer in layers(model, input_shape))


def describe(model: nn.Module, input_shape: tuple[int, ...], name: str = '') -> str:
  """A printable layer table with the totals."""
  rows = layers(model, input_shape)
  header = ('layer', 'kind', 'kernel', 'stride', 'output', 'params', 'mult-adds')
  table = [header] + [
      (r.path, r.kind, r.kernel, r.strides, 'x'.join(map(str, r.output_shape)),
       f'{r.params:,}', f'{r.macs:,}') for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ['  '.join(cell.ljust(w) if i < 5 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))) for row in table]
  lines.insert(1, '-' * len(lines[0]))
  variables = variable_shapes(model, input_shape)
  params = count_params(variables['params'])
  stats = count_params(variables.get('batch_stats', {}))
  macs = sum(r.macs for r in rows)
  title = f'{name} on {"x".join(map(str, input_shape))} input' if name else ''
  return '\n'.join(
      ([title] if title else []) + lines + [
          '',
          f'conv/dense layers:    {len(rows)}',
          f'trainable parameters: {params:,} ({params / 1e6:.2f}M)',
          f'BN running stats:     {stats:,} (not trained)',
          f'multiply-adds:        {macs:,} ({macs / 1e9:.2f} x 10^9 per image)',
      ])
