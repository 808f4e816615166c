"""The cheap part of preprocessing, inside the jitted steps: uint8 images in, model inputs out.

The host sends uint8 images (a quarter of float32's memory and host-to-device
traffic); here they become float, get the random flips, PCA lighting and
CIFAR pad-and-crop of training, and are normalised (per-channel or per-pixel
mean, optional std). Randomness comes from (seed, step, example index in the
global batch), so a resumed run and every device layout (jit over a mesh,
pmap, several hosts) draw the same augmentation. jax only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# AlexNet's PCA of ImageNet RGB on the [0, 1] scale (as fb.resnet.torch uses it).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceAugment:
  """What the steps do to the uint8 images of a batch.

  mean, std: on the [0, 1] scale, shape (3,) (per channel) or (H, W, 3) (per
  pixel); std None divides by nothing. crop_padding > 0: zero-pad the
  normalised image by that many pixels and take a random crop of the original
  size (CIFAR, paper Sec. 4.2). flip: random left-right flips. pca_lighting:
  the std of AlexNet's PCA colour noise (0: none).
  """
  mean: Any
  std: Any = None
  crop_padding: int = 0
  flip: bool = False
  pca_lighting: float = 0.0
  seed: int = 0

  def _normalise(self, images: jax.Array, per_channel: bool = False) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0 - self._fit(self.mean, images, per_channel)
    return x if self.std is None else x / self._fit(self.std, images, per_channel)

  @staticmethod
  def _fit(stats: Any, images: jax.Array, per_channel: bool) -> jax.Array:
    """Per-pixel statistics for images of their size; per channel (their spatial mean) for
    images of another size or where asked."""
    stats = jnp.asarray(stats, jnp.float32)
    if stats.ndim == 3 and (per_channel or stats.shape[:2] != images.shape[-3:-1]):
      stats = stats.mean(axis=(0, 1))
    return stats

  def eval(self, images: jax.Array, whole_images: bool = False) -> jax.Array:
    """Normalised float32 images; (batch, crops, H, W, C) batches too. `whole_images`
    (fully-convolutional testing: images of any size on a canvas) always takes per-channel
    statistics, which are not tied to a crop's pixel positions."""
    return self._normalise(images, per_channel=whole_images)

  def train(self, images: jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
    """Augmented, normalised float32 images; `index`: each example's place in the global batch."""
    if self.crop_padding:  # mean first (it is per pixel), then zero padding, as in the paper
      x = self._normalise(images)
      keys = self.keys(step, index)
      x = jax.vmap(self._pad_and_crop)(keys, x)
    else:
      x = images.astype(jnp.float32) / 255.0
      keys = self.keys(step, index)
    if self.flip:
      flips = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1)))(keys)
      x = jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
    if self.pca_lighting:
      alpha = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), (3,)))(keys)
      rgb = (alpha * self.pca_lighting * jnp.asarray(IMAGENET_EIGVAL)) @ jnp.asarray(
          IMAGENET_EIGVEC).T
      x = x + rgb[:, None, None, :]
    if not self.crop_padding:
      x = x - jnp.asarray(self.mean, jnp.float32)
      x = x if self.std is None else x / jnp.asarray(self.std, jnp.float32)
    return x

  def keys(self, step: jax.Array, index: jax.Array) -> jax.Array:
    """One key per example, from (seed, step, index) only."""
    base = jax.random.fold_in(jax.random.key(self.seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)

  def _pad_and_crop(self, key: jax.Array, x: jax.Array) -> jax.Array:
    p = self.crop_padding
    padded = jnp.pad(x, ((p, p), (p, p), (0, 0)))
    dy, dx = jax.random.randint(jax.random.fold_in(key, 0), (2,), 0, 2 * p + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), x.shape)


def example_index(local_batch: int, axis_name: str | None) -> jax.Array:
  """Each example's place in the global batch: under pmap, after the earlier devices'."""
  index = jnp.arange(local_batch)
  if axis_name:
    index = index + jax.lax.axis_index(axis_name) * local_batch
  return index
