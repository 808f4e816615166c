"""Per-layer analyses of a trained net for the sweep report (the paper's Sec. 4.2 and Fig. 7).

For every 3x3 layer (the BN that follows each 3x3 conv), on a fixed batch of
eval images:
- its response: the std of the BN output (before the addition and the ReLU)
  with the running statistics (eval mode, the paper's Fig. 7) and with the
  batch's own statistics (train mode), per channel, then the mean and the
  median over channels;
- the backward signal: the norm of the gradient of the training loss
  (train mode, as in a step) with respect to that layer's output and with
  respect to its conv kernel.
The model is untouched: the gradient with respect to an output comes from a
zero added to it through flax's method interception.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax.batch_norm import BatchNorm

# The BN layers that follow a block's convs or the stem (`analyse` keeps those of 3x3 convs).
RESPONSE_LAYER = re.compile(r'^(stem_bn|stage\d+_block\d+/bn[12])$')


def layer_order(name: str) -> tuple[int, int, int]:
  if name == 'stem_bn':
    return (0, 0, 0)
  stage, block, bn = map(int, re.findall(r'\d+', name))
  return (stage, block, bn)


def _kernel_path(name: str) -> tuple[str, ...]:
  """The conv before a response layer: stem_bn -> stem_conv, .../bnK -> .../convK."""
  if name == 'stem_bn':
    return ('stem_conv',)
  block, bn = name.split('/')
  return (block, 'conv' + bn[2:])


def _bn_name(module: nn.Module) -> str | None:
  if isinstance(module, BatchNorm):
    name = '/'.join(module.path)
    return name if RESPONSE_LAYER.match(name) else None
  return None


def _outputs(model: nn.Module, variables: dict[str, Any], images: jax.Array, train: bool,
             added: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(logits, {layer: BN output}); `added` is added to those outputs on the way."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    name = _bn_name(context.module) if context.method_name == '__call__' else None
    if name is not None:
      if added is not None:
        y = y + added[name]
      seen[name] = y
    return y

  with nn.intercept_methods(interceptor):
    if train:
      logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    else:
      logits = model.apply(variables, images, train=False)
  return logits, seen


def analyse(model: nn.Module, variables: dict[str, Any], images: np.ndarray,
            labels: np.ndarray) -> dict[str, list[float]]:
  """Per-layer figures in layer order: response stds (eval and train mode, mean and median
  over channels), gradient norms (with respect to the output and to the kernel)."""

  def stds(outputs):
    per_channel = {k: jnp.std(v.astype(jnp.float32), axis=(0, 1, 2)) for k, v in outputs.items()}
    return ({k: jnp.mean(v) for k, v in per_channel.items()},
            {k: jnp.median(v) for k, v in per_channel.items()})

  @jax.jit
  def figures(variables, images, labels):
    _, eval_out = _outputs(model, variables, images, train=False)
    _, train_out = _outputs(model, variables, images, train=True)
    zeros = {k: jnp.zeros_like(v) for k, v in train_out.items()}

    def loss(params, added):
      logits, _ = _outputs(model, {**variables, 'params': params}, images, train=True,
                           added=added)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    kernel_grads, output_grads = jax.grad(loss, argnums=(0, 1))(variables['params'], zeros)
    norm = lambda g: jnp.linalg.norm(g.astype(jnp.float32))
    kernels = {k: norm(_get(kernel_grads, _kernel_path(k))['kernel']) for k in zeros}
    outputs = {k: norm(v) for k, v in output_grads.items()}
    return stds(eval_out), stds(train_out), outputs, kernels

  (eval_mean, eval_median), (train_mean, train_median), outputs, kernels = jax.device_get(
      figures(variables, jnp.asarray(images), jnp.asarray(labels)))
  # The paper's Fig. 7 is about 3x3 layers: not the 7x7 stem, nor bottlenecks' 1x1 convs.
  is_3x3 = lambda k: _get(variables['params'], _kernel_path(k))['kernel'].shape[:2] == (3, 3)
  order = sorted((k for k in outputs if is_3x3(k)), key=layer_order)
  listed = lambda d: [float(d[k]) for k in order]
  return {'layers': order,
          'response_std_eval': listed(eval_mean), 'response_std_train': listed(train_mean),
          'response_std_eval_median': listed(eval_median),
          'response_std_train_median': listed(train_median),
          'output_gradient_norm': listed(outputs), 'kernel_gradient_norm': listed(kernels)}


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree
