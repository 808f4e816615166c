"""torchvision ResNet and VGG-19 weights as this project's params and batch_stats.

torchvision's ImageNet checkpoints are the usual starting point for
fine-tuning and the usual reference for evaluation. `convert` maps one of
their state dicts (any mapping of names to arrays) onto the variables of the
matching net here. Every key, shape and dtype is checked before anything is
built, so a wrong file fails with the offending keys named and nothing
half-loaded. `load` does it all from a file (read by `weight_files`) and a
config's model section.

Layouts: torch convs are OIHW on NCHW maps, Flax convs HWIO on NHWC; torch
Linear weights are (out, in), Flax Dense kernels (in, out); torch BN keeps
weight/bias/running_mean/running_var (num_batches_tracked only counts training
steps and is dropped), ours scale/bias in params and mean/var in batch_stats.
Both use BN epsilon 1e-5.

Where the converted net computes exactly what torchvision's does:
* ResNet-18/34/50/101/152 at any input size. Both pad every conv and the stem
  max pool explicitly and symmetrically, and both end in a global average pool.
  torchvision's bottleneck nets stride the 3x3 conv (the "v1.5" variant), so
  ResNet-50/101/152 need `bottleneck_stride='3x3'`: the paper's (and our
  default) '1x1' has the same shapes but computes another function, so
  `torchvision_architecture` refuses it. Shortcuts are option B (torchvision's
  `downsample`: 1x1 conv + BN where the shape changes, identity elsewhere).
* VGG-19 (and VGG-19-BN) where its last feature map is 7x7, i.e. inputs with
  height and width both in 224..255. torchvision's AdaptiveAvgPool2d((7, 7)) is
  then the identity, and our VGG has no such pool: its fc1 takes the flattened
  last map as it is. At any other size our fc1 no longer has torchvision's
  shape and `model.apply` fails, except on maps of another shape with 49 cells
  (e.g. 1568x32 inputs, a 49x1 map), which run but differ. torch flattens
  (C, H, W), we flatten (H, W, C), so fc1's input rows are permuted.

Arrays come back as float32 numpy arrays on the host, so a caller can place
or shard them as it likes.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from resnet_jax import models
from resnet_jax.weight_files import WeightsError, as_numpy, load_state_dict

# torchvision's names of the nets that convert.
ARCHITECTURES = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg19', 'vgg19_bn')
# The input size the abstract variables are built for (VGG's fc1 depends on it).
INPUT_SHAPE = (224, 224, 3)
# How many offending keys an error message lists before it says "and N more".
_SHOWN = 8


def _check_arch(arch: str) -> None:
  if arch not in ARCHITECTURES:
    raise WeightsError(f'No conversion for {arch!r}: torchvision weights convert for '
                       f'{", ".join(ARCHITECTURES)}.')


def model_name(arch: str) -> str:
  """This project's registry name for torchvision's `arch` ('vgg19' for 'vgg19_bn')."""
  _check_arch(arch)
  return 'vgg19' if arch.startswith('vgg19') else arch


def model_options(arch: str) -> dict[str, Any]:
  """The `models.create_model` options that build torchvision's `arch`.

  ResNet-50/101/152 stride the 3x3 conv of a bottleneck, as torchvision's do;
  shortcuts are option B; VGG-19-BN is our VGG-19 with `batch_norm=True`.
  """
  _check_arch(arch)
  if arch.startswith('vgg19'):
    return {'batch_norm': arch == 'vgg19_bn'}
  options: dict[str, Any] = {'shortcut': 'B'}
  if models.IMAGENET_STAGES[int(arch[len('resnet'):])][0] is models.BottleneckBlock:
    options['bottleneck_stride'] = '3x3'
  return options


def torchvision_architecture(model_config: Mapping[str, Any]) -> str:
  """The torchvision net whose weights fit the model a config section describes.

  `model_config` is what `models.create_model_from_config` takes ({'name': ...,
  option: value or None}). Options that change what the net computes but not
  its shapes (bottleneck_stride, shortcut) must be torchvision's, or loading
  would silently give another function: those raise WeightsError, saying what
  to set. Options that only change how it runs (dtype, BN settings for
  training, oneDNN) may be anything.
  """
  options = dict(model_config)
  name = options.pop('name')
  arch = 'vgg19_bn' if name == 'vgg19' and options.get('batch_norm') else name
  if arch not in ARCHITECTURES:
    raise WeightsError(f'torchvision has no weights for model {name!r}: they convert for '
                       f'{", ".join(ARCHITECTURES)} (vgg19_bn is vgg19 with batch_norm=True).')
  got = models.create_model(name, 1, **options)
  want = models.create_model(model_name(arch), 1, **model_options(arch))
  for key in model_options(arch):
    if getattr(got, key) != getattr(want, key):
      raise WeightsError(
          f'model.{key}={getattr(got, key)!r} does not match torchvision\'s {arch}, which '
          f'has {key}={getattr(want, key)!r}; set model.{key}={getattr(want, key)!r} to use '
          f'its weights.')
  return arch


# --- The layout: which torchvision key is which of our variables. ---------------


@dataclasses.dataclass(frozen=True)
class _Entry:
  key: str  # torchvision's name
  collection: str  # 'params' or 'batch_stats'
  path: tuple[str, ...]  # inside the collection
  kind: str  # 'conv', 'dense', 'fc1' (dense with permuted rows) or 'vector'
  shape: tuple[int, ...]  # torchvision's shape


_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
               ('params', 'scale'): 'weight', ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}


def _resnet_prefix(modules: tuple[str, ...]) -> str:
  top = {'stem_conv': 'conv1', 'stem_bn': 'bn1', 'head': 'fc'}
  if modules[0] in top:
    return top[modules[0]]
  stage, block = re.fullmatch(r'stage(\d+)_block(\d+)', modules[0]).groups()
  inner = '/'.join(modules[1:])
  inner = {'shortcut/conv': 'downsample.0', 'shortcut/bn': 'downsample.1'}.get(inner, inner)
  return f'layer{stage}.{int(block) - 1}.{inner}'


def _vgg_prefixes(stage_sizes: Iterable[int], batch_norm: bool) -> dict[str, str]:
  """torchvision's `features` is one Sequential of conv, [BN,] ReLU ... max pool."""
  names, index = {}, 0
  for i, num_convs in enumerate(stage_sizes, 1):
    for j in range(1, num_convs + 1):
      names[f'stage{i}_conv{j}'] = f'features.{index}'
      if batch_norm:
        names[f'stage{i}_bn{j}'] = f'features.{index + 1}'
      index += 3 if batch_norm else 2
    index += 1  # the max pool
  names.update(fc1='classifier.0', fc2='classifier.3', head='classifier.6')
  return names


@functools.lru_cache(maxsize=16)
def _layout(arch: str, num_classes: int) -> tuple[_Entry, ...]:
  """Every variable of our net for `arch`, with its torchvision key and shape.

  Derived from the abstract variables of the net `models.create_model` builds,
  so the check is against the real model, not a second description of it.
  """
  model = models.create_model(model_name(arch), num_classes, **model_options(arch))
  found: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []

  def walk(collection: str, node: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for name, value in node.items():  # creation order, the order of torchvision's keys too
      if isinstance(value, Mapping):
        walk(collection, value, path + (name,))
      else:
        found.append((collection, path + (name,), tuple(value.shape)))

  def init() -> None:
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + INPUT_SHAPE), train=False)
    for collection in ('params', 'batch_stats'):
      walk(collection, variables.get(collection, {}), ())

  jax.eval_shape(init)
  # torchvision lists a BN's running statistics right after its weight and bias.
  module_order: dict[tuple[str, ...], int] = {}
  for _, path, _ in found:
    module_order.setdefault(path[:-1], len(module_order))
  found.sort(key=lambda item: (module_order[item[1][:-1]], item[0] != 'params'))

  vgg_names = _vgg_prefixes(model.stage_sizes, model.batch_norm) if arch.startswith('vgg') else {}
  entries = []
  for collection, path, shape in found:
    modules, leaf_name = path[:-1], path[-1]
    prefix = vgg_names[modules[0]] if vgg_names else _resnet_prefix(modules)
    if leaf_name != 'kernel':
      kind, torch_shape = 'vector', shape
    elif len(shape) == 4:
      kind, torch_shape = 'conv', (shape[3], shape[2], shape[0], shape[1])
    else:
      kind, torch_shape = 'fc1' if modules == ('fc1',) else 'dense', (shape[1], shape[0])
    entries.append(_Entry(f'{prefix}.{_LEAF_NAMES[collection, leaf_name]}', collection, path,
                          kind, torch_shape))
  return tuple(entries)


def _fc1_grid(layout: Iterable[_Entry]) -> tuple[int, int, int]:
  """(C, H, W) of the map VGG's fc1 flattens: C from the last conv, H = W."""
  convs = [e for e in layout if e.kind == 'conv']
  fc1 = next(e for e in layout if e.kind == 'fc1')
  channels = convs[-1].shape[0]
  side = int(round((fc1.shape[1] // channels) ** 0.5))
  return channels, side, side


def fc1_to_flax(weight: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
  """torch Linear weight (out, C*H*W) read in (C, H, W) order -> our kernel (H*W*C, out)."""
  channels, height, width = grid
  out = weight.shape[0]
  kernel = np.empty((height * width, channels, out), weight.dtype)
  # In blocks of outputs: one strided copy of VGG's 400 MB fc1 is ~4x slower.
  for start in range(0, out, 64):
    block = weight[start:start + 64].reshape(-1, channels, height * width)
    kernel[:, :, start:start + 64] = block.transpose(2, 1, 0)
  return kernel.reshape(-1, out)


def fc1_to_torch(kernel: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
  """The inverse of `fc1_to_flax`."""
  channels, height, width = grid
  out = kernel.shape[1]
  ochw = kernel.reshape(height, width, channels, out).transpose(3, 2, 0, 1)
  return np.ascontiguousarray(ochw).reshape(out, -1)


def _fresh_float32(array: np.ndarray, source: np.ndarray) -> np.ndarray:
  """`array` as a C-contiguous float32 array that shares no memory with `source`."""
  if (array.dtype == np.float32 and array.flags.c_contiguous
      and not np.may_share_memory(array, source)):
    return array
  return np.array(array, np.float32, order='C')


def _to_flax(array: np.ndarray, kind: str, grid: tuple[int, int, int] | None) -> np.ndarray:
  if kind == 'conv':
    result = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif kind == 'dense':
    result = array.T
  elif kind == 'fc1':
    result = fc1_to_flax(array, grid)
  else:
    result = array
  return _fresh_float32(result, array)


def _to_torch(array: Any, kind: str, grid: tuple[int, int, int] | None) -> np.ndarray:
  array = np.asarray(array)
  if kind == 'conv':
    result = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  elif kind == 'dense':
    result = array.T
  elif kind == 'fc1':
    result = fc1_to_torch(array, grid)
  else:
    result = array
  return _fresh_float32(result, array)


# --- Checking and converting. -----------------------------------------------------


def guess_architecture(keys: Iterable[str]) -> str | None:
  """What torchvision net a state dict's keys look like, for error messages.

  A torchvision name ('resnet50', 'vgg16_bn', ...) or a description of a
  ResNet with other stage sizes; None when the keys look like neither family.
  Wide ResNets and ResNeXts have ResNet-50/101's keys (their shapes differ).
  """
  keys = set(keys)
  blocks: dict[int, int] = {}
  for key in keys:
    match = re.match(r'layer(\d+)\.(\d+)\.', key)
    if match:
      stage = int(match[1])
      blocks[stage] = max(blocks.get(stage, 0), int(match[2]) + 1)
  if blocks and 'conv1.weight' in keys:
    bottleneck = any('.conv3.' in key for key in keys)
    sizes = tuple(blocks.get(i, 0) for i in range(1, max(blocks) + 1))
    for depth, (block_cls, stage_sizes) in models.IMAGENET_STAGES.items():
      if (block_cls is models.BottleneckBlock) == bottleneck and tuple(stage_sizes) == sizes:
        return f'resnet{depth}'
    return f'a ResNet with {"bottleneck" if bottleneck else "basic"} blocks {sizes}'
  if any(key.startswith('features.') for key in keys) and 'classifier.6.weight' in keys:
    weights = sum(bool(re.fullmatch(r'features\.\d+\.weight', key)) for key in keys)
    norms = sum(bool(re.fullmatch(r'features\.\d+\.running_mean', key)) for key in keys)
    return f'vgg{weights - norms + 3}' + ('_bn' if norms else '')
  return None


def _shown(items: list[str], separator: str) -> str:
  more = f'{separator}... ({len(items) - _SHOWN} more)' if len(items) > _SHOWN else ''
  return separator.join(items[:_SHOWN]) + more


def _listing(what: str, keys: list[str]) -> str:
  return f'{len(keys)} {what}: {_shown(keys, ", ")}'


def _key_error(arch: str, keys: list[str], missing: list[str],
               unexpected: list[str]) -> WeightsError:
  guess = guess_architecture(keys)
  message = f'The state dict does not fit torchvision\'s {arch}'
  if all(key.startswith('module.') for key in keys) and keys:
    stripped = guess_architecture(key[len('module.'):] for key in keys)
    message += (f': every key starts with \'module.\' (saved from a DataParallel wrapper'
                f'{", a " + stripped if stripped else ""}); strip it first')
  elif guess is not None and guess != arch:
    message += f': its keys look like torchvision\'s {guess}'
    if guess in ARCHITECTURES:
      message += f' (convert it as {guess!r}, i.e. model {model_name(guess)!r} with ' \
                 f'{model_options(guess)})'
  parts = [_listing('missing keys', missing)] if missing else []
  if unexpected:
    parts.append(_listing('unexpected keys', unexpected))
  return WeightsError(f'{message}. {"; ".join(parts)}.', missing=missing, unexpected=unexpected)


def _is_float(array: np.ndarray) -> bool:
  return array.dtype.kind == 'f' or array.dtype == ml_dtypes.bfloat16


def _head_key(arch: str) -> str:
  return 'classifier.6.weight' if arch.startswith('vgg') else 'fc.weight'


def convert(state_dict: Mapping[str, Any], arch: str,
            num_classes: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, batch_stats) of our net for torchvision's `arch` from its state dict.

  The values may be numpy or jax arrays or torch tensors, of any floating
  dtype (returned as float32). `num_classes` defaults to the classifier's.
  Build the matching net with `models.create_model(model_name(arch),
  num_classes, **model_options(arch))`. Raises WeightsError, naming the keys,
  for missing, unexpected or misshapen entries, before converting anything.
  """
  _check_arch(arch)
  keys = list(state_dict)
  if not all(isinstance(key, str) for key in keys):
    others = [repr(key) for key in keys if not isinstance(key, str)]
    raise WeightsError(f'State dict keys must be strings, got {_shown(others, ", ")}.')
  head_key = _head_key(arch)
  classes = num_classes
  if classes is None:
    head_shape = np.shape(state_dict[head_key]) if head_key in state_dict else ()
    classes = head_shape[0] if len(head_shape) == 2 and head_shape[0] >= 1 else 1000
  layout = _layout(arch, classes)
  expected = {entry.key: entry for entry in layout}
  ignored = {entry.key[:-len('running_mean')] + 'num_batches_tracked'
             for entry in layout if entry.key.endswith('.running_mean')}
  missing = [key for key in expected if key not in state_dict]
  unexpected = [key for key in keys if key not in expected and key not in ignored]
  if missing or unexpected:
    raise _key_error(arch, keys, missing, unexpected)

  arrays, problems = {}, {}
  for key, entry in expected.items():
    try:
      array = as_numpy(state_dict[key])
    except Exception as e:  # pylint: disable=broad-except
      problems[key] = f'not an array ({type(state_dict[key]).__name__}: {e})'
      continue
    if array.shape != entry.shape:
      problems[key] = f'shape {array.shape}, expected {entry.shape}'
      if key in (head_key, head_key.replace('weight', 'bias')) and num_classes is not None:
        problems[key] += f' for num_classes={num_classes}'
    elif not _is_float(array):
      problems[key] = f'dtype {array.dtype}, expected a floating-point dtype'
    arrays[key] = array
  if problems:
    lines = [f'{key}: {problem}' for key, problem in problems.items()]
    note = ''
    if arch in ('resnet50', 'resnet101') and 'layer1.0.conv2.weight' in problems:
      note = (f' (torchvision\'s wide_resnet and resnext nets have {arch}\'s keys with other '
              f'shapes; they do not convert)')
    raise WeightsError(f'The state dict has the keys of torchvision\'s {arch} but '
                       f'{len(lines)} entries do not fit it{note}: {_shown(lines, "; ")}.',
                       mismatched=list(problems))

  grid = _fc1_grid(layout) if arch.startswith('vgg') else None
  trees: dict[str, dict[str, Any]] = {'params': {}, 'batch_stats': {}}
  for entry in layout:
    node = trees[entry.collection]
    for name in entry.path[:-1]:
      node = node.setdefault(name, {})
    node[entry.path[-1]] = _to_flax(arrays[entry.key], entry.kind, grid)
  return trees['params'], trees['batch_stats']


def to_torchvision(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                   arch: str) -> dict[str, np.ndarray]:
  """The inverse of `convert`: a state dict that torchvision's `arch` loads.

  For taking a net trained here back to PyTorch (num_batches_tracked, which
  only counts training steps, is left out: load with strict=False or add it).
  """
  _check_arch(arch)
  layout = _layout(arch, int(np.shape(params['head']['kernel'])[-1]))
  grid = _fc1_grid(layout) if arch.startswith('vgg') else None
  trees = {'params': params, 'batch_stats': batch_stats}
  state_dict = {}
  for entry in layout:
    node: Any = trees[entry.collection]
    for name in entry.path:
      node = node[name]
    state_dict[entry.key] = _to_torch(node, entry.kind, grid)
  return state_dict


def load(path: str | os.PathLike, model_config: Mapping[str, Any],
         num_classes: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, batch_stats) for the model a config section describes, from a
  torchvision weights file (see `weight_files.load_state_dict`,
  `torchvision_architecture`)."""
  arch = torchvision_architecture(model_config)
  return convert(load_state_dict(path), arch, num_classes)
