"""The cheap half of the input pipeline, inside the steps (resnet_jax/data/device_augment.py):
flips, PCA lighting, CIFAR pad-and-crop and normalisation of uint8 batches, and the
whole images on a canvas of fully-convolutional testing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import assembly, models, steps
from resnet_jax.data import device_augment as augment
from resnet_jax.data import image_ops
from tests.conftest import DEVICES
from tests.support import helpers

# AlexNet's PCA of ImageNet RGB on the [0, 1] scale, as fb.resnet.torch publishes it: the
# reference's own copy, so that a changed constant in the module shows.
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                   [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]])


def _host_reference(images, mean, std, flips, alphas, offsets, padding, pca):
  """The same augmentation in numpy on the host, from the same random draws."""
  out = []
  for image, flip, alpha, (dy, dx) in zip(images, flips, alphas, offsets):
    x = image.astype(np.float64) / 255.0
    if padding:
      x = (x - mean) / (std if std is not None else 1.0)
      x = np.pad(x, [[padding, padding], [padding, padding], [0, 0]])[
          dy:dy + image.shape[0], dx:dx + image.shape[1]]
    if flip:
      x = x[:, ::-1]
    if pca:
      x = x + EIGVEC @ (alpha * pca * EIGVAL)
    if not padding:
      x = (x - mean) / (std if std is not None else 1.0)
    out.append(x)
  return np.stack(out)


@pytest.mark.parametrize('kind', ['scale', 'cifar'])
def test_device_augmentation_equals_the_host_reference(kind):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  if kind == 'scale':
    aug = augment.DeviceAugment(mean=np.asarray(image_ops.IMAGENET_MEAN, np.float32),
                                std=np.asarray(image_ops.IMAGENET_STD, np.float32), flip=True,
                                pca_lighting=0.1, seed=3)
  else:
    aug = augment.DeviceAugment(mean=rng.uniform(0.3, 0.6, (16, 16, 3)).astype(np.float32),
                                crop_padding=4, flip=True, seed=3)
  step, index = 7, np.arange(6)
  got = np.asarray(jax.jit(aug.train)(images, step, index))
  keys = aug.keys(step, index)
  flips = [bool(jax.random.bernoulli(jax.random.fold_in(k, 1))) for k in keys]
  alphas = [np.asarray(jax.random.normal(jax.random.fold_in(k, 2), (3,))) for k in keys]
  offsets = [np.asarray(jax.random.randint(jax.random.fold_in(k, 0), (2,), 0, 9)) for k in keys]
  want = _host_reference(images, aug.mean, aug.std, flips, alphas, offsets, aug.crop_padding,
                         aug.pca_lighting)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert 0 < sum(flips) < 6  # both kinds drawn
  # Eval: normalisation only, for one crop or ten.
  ten = np.stack([images] * 10, axis=1)
  np.testing.assert_allclose(np.asarray(aug.eval(ten))[:, 3],
                             (images / 255.0 - aug.mean) / (1 if aug.std is None else aug.std),
                             rtol=1e-5, atol=1e-6)


def test_augmentation_depends_on_seed_step_and_example_only():
  aug = augment.DeviceAugment(mean=np.zeros(3, np.float32), crop_padding=4, flip=True, seed=1)
  images = np.full((8, 8, 8, 3), 255, np.uint8)
  a = np.asarray(aug.train(images, 5, np.arange(8)))
  np.testing.assert_array_equal(a, np.asarray(aug.train(images, 5, np.arange(8))))
  # The second half on its own (another device's shard) draws what it drew in the whole.
  np.testing.assert_array_equal(a[4:], np.asarray(aug.train(images[4:], 5, np.arange(4, 8))))
  assert not np.array_equal(a, np.asarray(aug.train(images, 6, np.arange(8))))
  # Some crops reach into the zero padding, none is padding only.
  assert (a == 0).all(-1).any() and (a.reshape(8, -1).max(1) == 1.0).all()


def test_jit_and_pmap_augment_the_same_examples_alike():
  """Under pmap each device's examples keep their place in the global batch."""
  assert jax.device_count() == DEVICES
  config = helpers.small_config(batch_size=16)
  aug = augment.DeviceAugment(mean=np.full(3, 0.5, np.float32), crop_padding=2, flip=True,
                              pca_lighting=0.1, seed=2)
  rng = np.random.default_rng(1)
  batch = {'image': rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  metrics = {}
  for mode in ('jit', 'pmap'):
    config.parallel = mode
    strategy = assembly.create_strategy(
        config, lambda axis: models.create_model_from_config(config.model, 10, bn_axis_name=axis),
        (16, 16, 3), steps_per_epoch=10, steps_total=100, augment=aug)
    state = strategy.init_state(jax.random.key(0))
    _, m = strategy.train_step(state, strategy.put_batch(batch))
    metrics[mode] = strategy.metrics_to_host(m)
  for key in metrics['jit']:
    np.testing.assert_allclose(metrics['pmap'][key], metrics['jit'][key], rtol=1e-5, err_msg=key)


def _perturbed(variables, seed):
  """Variables with random BN scales, biases and running statistics: BN then maps a zero to
  a non-zero value, as in a trained net (so padding that leaks in would show)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  def change(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    if any(k in name for k in ("'mean'", "'bias'", "'scale'")):
      return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape) + ("'scale'" in name), leaf.dtype)
    return leaf
  return jax.tree_util.tree_unflatten(tree, [change(p, l) for p, l in leaves])


@pytest.mark.parametrize('name,canvas,shapes', [
    ('resnet20', 64, [(40, 48), (37, 61), (64, 64)]),
    ('resnet18', 96, [(70, 96), (96, 45), (33, 50)]),  # 7x7/2 stem and max pool
])
def test_on_a_canvas_each_image_gets_the_logits_it_gets_alone(name, canvas, shapes):
  """Fully-convolutional testing: images at the top left of a canvas, and their mirrors
  (steps.mirror_on_canvas), score exactly as each image alone (and its mirror) would."""
  model = models.create_model(name, 7)
  rng = np.random.default_rng(0)
  variables = _perturbed(model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False), 2)
  images = [jnp.asarray(rng.normal(size=(1, h, w, 3)), jnp.float32) for h, w in shapes]
  garbage = jnp.asarray(rng.normal(size=(len(shapes), canvas, canvas, 3)), jnp.float32)
  on_canvas = garbage  # what lies around the image must not matter
  valid = jnp.zeros((len(shapes), canvas, canvas), bool)
  for i, image in enumerate(images):
    h, w = image.shape[1:3]
    on_canvas = on_canvas.at[i, :h, :w].set(image[0])
    valid = valid.at[i, :h, :w].set(True)
  logits = model.apply(variables, on_canvas, train=False, valid=valid)
  mirrored = model.apply(variables, steps.mirror_on_canvas(on_canvas, valid), train=False,
                         valid=valid)
  for i, image in enumerate(images):
    alone = model.apply(variables, image, train=False)[0]
    np.testing.assert_allclose(logits[i], alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())
    flipped = model.apply(variables, image[:, :, ::-1], train=False)[0]
    np.testing.assert_allclose(mirrored[i], flipped, rtol=1e-4,
                               atol=1e-4 * np.abs(flipped).max())
  assert np.abs(np.asarray(logits) - np.asarray(mirrored)).max() > 1e-2  # mirrors do differ


def test_a_canvas_the_image_fills_is_the_plain_network():
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  model = models.create_model('resnet18', 5)
  variables = model.init(jax.random.key(1), x, train=False)
  plain = model.apply(variables, x, train=False)
  everywhere = model.apply(variables, x, train=False, valid=jnp.ones((2, 64, 64), bool))
  np.testing.assert_allclose(everywhere, plain, rtol=1e-5, atol=1e-6)


def test_whole_images_on_a_canvas_take_the_per_channel_mean():
  """A canvas of the crop size holds an image at its top left, not a crop: the per-pixel
  mean (tied to crop positions) would misalign, so the channels' means apply."""
  mean = np.random.default_rng(0).uniform(0, 1, (4, 4, 3)).astype(np.float32)
  aug = augment.DeviceAugment(mean=mean)
  images = np.full((1, 4, 4, 3), 255, np.uint8)
  np.testing.assert_allclose(aug.eval(images)[0], 1.0 - mean, rtol=1e-6)
  np.testing.assert_allclose(aug.eval(images, whole_images=True)[0],
                             np.broadcast_to(1.0 - mean.mean((0, 1)), (4, 4, 3)), rtol=1e-6)
