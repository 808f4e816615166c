"""Records torchvision's logits for seeded random weights: tests/data/torchvision_logits.npz.

Why: tests/test_torchvision_weights.py checks the conversion of torchvision
weights against torchvision itself, but CI has no torch. Run once where torch
and torchvision are installed (neither jax nor resnet_jax is needed):

    python tests/data/torchvision_fixture.py

It draws each net's weights and input images with `random_torchvision_state_dict`
and `random_images` (numpy only, seeded), loads the weights into torchvision's
net (strictly: this also checks the generator's keys and shapes against
torchvision's), and records the logits, the seeds, shapes and the library
versions in a few KB. The test imports the same two functions (this module
imports only numpy at the top), regenerates the same arrays and converts them.
The logits are computed in float64, so they carry no error of torch's own.
"""
from __future__ import annotations

import os
import sys

import numpy as np

# torchvision's ResNets: block kind and blocks per stage.
RESNET_BLOCKS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
    'resnet152': ('bottleneck', (3, 8, 36, 3)),
}
# torchvision's VGG-19 ("E"): conv widths, 'M' for a 2x2 max pool.
VGG19_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M',
             512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M')

# What the fixture records: net, classes, weight seed, image seed, images (N, C, H, W).
# ResNet-50 on odd, non-square images: every stride-2 layer then sees odd
# sizes, where a padding convention that differed would show. VGG-19 needs its
# last map to be 7x7 (224..255 pixels); one image keeps it quick.
CASES = {
    'resnet18': ('resnet18', 10, 18, 1018, (2, 3, 64, 64)),
    'resnet50': ('resnet50', 10, 50, 1050, (2, 3, 61, 75)),
    'vgg19': ('vgg19', 10, 19, 1019, (1, 3, 224, 224)),
}
# The weight of each residual branch's last BN (see `random_torchvision_state_dict`).
LAST_BN_LOW, LAST_BN_HIGH = 0.2, 0.4
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torchvision_logits.npz')


Layout = list[tuple[str, tuple[int, ...], str]]  # (key, shape, kind) in torchvision's order


def _bn(prefix: str, channels: int, weight: str = 'bn_weight') -> Layout:
  return [(f'{prefix}.weight', (channels,), weight), (f'{prefix}.bias', (channels,), 'bn_bias'),
          (f'{prefix}.running_mean', (channels,), 'bn_mean'),
          (f'{prefix}.running_var', (channels,), 'bn_var'),
          (f'{prefix}.num_batches_tracked', (), 'count')]


def torchvision_layout(arch: str, num_classes: int) -> Layout:
  """(key, shape, kind) of torchvision's state dict, in its order: an independent
  description of torchvision's nets (not derived from resnet_jax's)."""
  entries: Layout = []
  if arch in RESNET_BLOCKS:
    block, stage_sizes = RESNET_BLOCKS[arch]
    expansion = 4 if block == 'bottleneck' else 1
    entries += [('conv1.weight', (64, 3, 7, 7), 'conv')] + _bn('bn1', 64)
    in_channels = 64
    for i, (num_blocks, width) in enumerate(zip(stage_sizes, (64, 128, 256, 512)), 1):
      for j in range(num_blocks):
        prefix = f'layer{i}.{j}'
        if block == 'basic':
          convs = [(in_channels, width, 3), (width, width, 3)]
        else:
          convs = [(in_channels, width, 1), (width, width, 3), (width, width * expansion, 1)]
        for k, (cin, cout, size) in enumerate(convs, 1):
          entries += [(f'{prefix}.conv{k}.weight', (cout, cin, size, size), 'conv')]
          # The residual branch's last BN: see `random_torchvision_state_dict`.
          last = k == len(convs)
          entries += _bn(f'{prefix}.bn{k}', cout, 'bn_last_weight' if last else 'bn_weight')
        if j == 0 and (i > 1 or in_channels != width * expansion):
          shape = (width * expansion, in_channels, 1, 1)
          entries += [(f'{prefix}.downsample.0.weight', shape, 'conv')]
          entries += _bn(f'{prefix}.downsample.1', width * expansion)
        in_channels = width * expansion
    entries += [('fc.weight', (num_classes, in_channels), 'head'),
                ('fc.bias', (num_classes,), 'bias')]
    return entries
  if arch in ('vgg19', 'vgg19_bn'):
    batch_norm = arch == 'vgg19_bn'
    index, in_channels = 0, 3
    for width in VGG19_CFG:
      if width == 'M':
        index += 1
        continue
      entries += [(f'features.{index}.weight', (width, in_channels, 3, 3), 'conv'),
                  (f'features.{index}.bias', (width,), 'bias')]
      if batch_norm:
        entries += _bn(f'features.{index + 1}', width)
      index += 3 if batch_norm else 2
      in_channels = width
    entries += [('classifier.0.weight', (4096, 512 * 7 * 7), 'fc'),
                ('classifier.0.bias', (4096,), 'bias'),
                ('classifier.3.weight', (4096, 4096), 'fc'),
                ('classifier.3.bias', (4096,), 'bias'),
                ('classifier.6.weight', (num_classes, 4096), 'head'),
                ('classifier.6.bias', (num_classes,), 'bias')]
    return entries
  raise ValueError(f'No layout for {arch!r}.')


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], low: float,
             high: float) -> np.ndarray:
  # float32 draws, scaled in place: VGG-19's fc1 alone is 103M numbers.
  values = rng.random(shape, dtype=np.float32)
  values *= np.float32(high - low)
  values += np.float32(low)
  return values


def random_torchvision_state_dict(arch: str, num_classes: int, seed: int) -> dict[str, np.ndarray]:
  """torchvision's keys and shapes for `arch`, with seeded values that keep the
  activations O(1) through the net, so its logits are informative.

  Uniform draws only (numpy's most stable stream). Convs and hidden dense
  layers: He-uniform (variance 2 / fan-in); the classifier: variance 1 / fan-in;
  BN: weight in [0.75, 1.25], bias and running mean in [-0.2, 0.2], running
  variance in [0.5, 1.5], so that eval-mode BN is far from the identity. The
  last BN of each residual branch has its weight in [LAST_BN_LOW, LAST_BN_HIGH]:
  at ~1 every residual sum would double the variance (ResNet-50's logits reached
  ~4000), while ~0.3 keeps them O(1) and still lets every branch count.
  """
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape, kind in torchvision_layout(arch, num_classes):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if kind in ('conv', 'fc'):
      bound = (6.0 / fan_in) ** 0.5
      value = _uniform(rng, shape, -bound, bound)
    elif kind == 'head':
      bound = (3.0 / fan_in) ** 0.5
      value = _uniform(rng, shape, -bound, bound)
    elif kind == 'bn_weight':
      value = _uniform(rng, shape, 0.75, 1.25)
    elif kind == 'bn_last_weight':
      value = _uniform(rng, shape, LAST_BN_LOW, LAST_BN_HIGH)
    elif kind in ('bn_bias', 'bn_mean'):
      value = _uniform(rng, shape, -0.2, 0.2)
    elif kind == 'bn_var':
      value = _uniform(rng, shape, 0.5, 1.5)
    elif kind == 'bias':
      value = _uniform(rng, shape, -0.1, 0.1)
    else:  # num_batches_tracked
      value = np.array(0, np.int64)
    state_dict[key] = value
  return state_dict


def random_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
  """Seeded NCHW float32 images about the range of normalised photos.

  Each image has its own contrast and per-channel offsets: iid noise alone
  gives every image nearly the same pooled features, and so the same logits.
  """
  rng = np.random.default_rng(seed)
  noise = _uniform(rng, tuple(shape), -1.0, 1.0)
  contrast = _uniform(rng, (shape[0], 1, 1, 1), 0.5, 1.5)
  offset = _uniform(rng, (shape[0], shape[1], 1, 1), -1.0, 1.0)
  return (noise * contrast + offset).astype(np.float32)


def checksum(arrays: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
  """(sum, sum of squares) in float64: tells a changed generator from a wrong conversion."""
  values = arrays.values() if isinstance(arrays, dict) else [arrays]
  total = sum(float(np.sum(v, dtype=np.float64)) for v in values)
  squares = sum(float(np.einsum('i,i->', v.ravel(), v.ravel(), dtype=np.float64)) for v in values)
  return np.array([total, squares])


def main() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(min(2, torch.get_num_threads()))
  record: dict[str, np.ndarray] = {
      'torch_version': np.array(torch.__version__),
      'torchvision_version': np.array(torchvision.__version__),
      'numpy_version': np.array(np.__version__),
      'python_version': np.array(sys.version.split()[0]),
      'compute_dtype': np.array('float64'),
  }
  print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {np.__version__}')
  # The test checks every net's conversion against `torchvision_layout`: check that here.
  for arch in (*RESNET_BLOCKS, 'vgg19', 'vgg19_bn'):
    model = getattr(torchvision.models, arch)(weights=None, num_classes=7)
    theirs = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    ours = [(key, shape) for key, shape, _ in torchvision_layout(arch, 7)]
    assert theirs == ours, f'torchvision_layout({arch!r}) is not torchvision\'s'
  print('torchvision_layout matches torchvision\'s keys, order and shapes for '
        f'{", ".join((*RESNET_BLOCKS, "vgg19", "vgg19_bn"))}')
  for name, (arch, num_classes, weights_seed, images_seed, images_shape) in CASES.items():
    state_dict = random_torchvision_state_dict(arch, num_classes, weights_seed)
    images = random_images(images_shape, images_seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    # strict: every key of ours is torchvision's and vice versa, and shapes agree.
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    with torch.no_grad():
      logits = model.double()(torch.from_numpy(images).double()).numpy()
      logits32 = model.float()(torch.from_numpy(images)).numpy()
    scale = np.abs(logits).max()
    print(f'{name}: logits std {logits.std():.3f}, max |logit| {scale:.3f}, '
          f'torch float32 vs float64: max |diff| / max |logit| '
          f'{np.abs(logits32 - logits).max() / scale:.2e}')
    record.update({
        f'{name}/arch': np.array(arch),
        f'{name}/num_classes': np.array(num_classes),
        f'{name}/weights_seed': np.array(weights_seed),
        f'{name}/images_seed': np.array(images_seed),
        f'{name}/images_shape': np.array(images_shape),
        f'{name}/weights_checksum': checksum(state_dict),
        f'{name}/images_checksum': checksum(images),
        f'{name}/logits': logits,
    })
  np.savez_compressed(OUTPUT, **record)
  print(f'wrote {OUTPUT} ({os.path.getsize(OUTPUT)} bytes)')


if __name__ == '__main__':
  main()
