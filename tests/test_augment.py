"""The input pipeline's two halves: crop-first scale augmentation on the host (uint8 out) and
the cheap augmentation and normalisation inside the steps (resnet_jax/augment.py)."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from resnet_jax import augment, models, optim, parallel, steps
from resnet_jax import preprocessing as pp
from resnet_jax.datasets import sample_imagenet
from tests import helpers


def _encode(array, fmt='JPEG', mode=None):
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, quality=90)
  return tf.constant(buffer.getvalue())


@pytest.fixture(scope='module')
def photo():
  return sample_imagenet.photos()[1]  # flower.jpg, 427x640


@pytest.mark.parametrize('shape', [(375, 500), (500, 333), (427, 640)])
def test_crop_first_agrees_with_resize_then_crop_on_real_photos(photo, shape):
  """Only the window is decoded and resized: the same crop, up to interpolation."""
  array = np.asarray(Image.fromarray(photo).resize(shape[::-1], Image.BILINEAR))
  encoded = _encode(array)
  decoded = tf.io.decode_jpeg(encoded, channels=3)
  for seed in range(12):
    side, top, left = pp.sample_scale_crop(tf.constant([seed, 9], tf.int64), tf.shape(decoded),
                                           224, 256, 480)
    got = pp.crop_first_scale(encoded, 224, side, top, left).numpy().astype(float)
    want = pp.scale_and_crop(decoded, 224, side, top, left).numpy().astype(float)
    assert got.shape == want.shape == (224, 224, 3)
    difference = np.abs(got - want)
    assert difference.mean() < 8 and np.percentile(difference, 95) < 32, (
        int(side), int(top), int(left), difference.mean())
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.97  # a window 8 pixels off: 0.84
    # The window's edges are the exact crop's, rounded to whole source pixels.
    start, extent = pp.source_window(tf.shape(decoded), 224, side, top, left)
    scale = pp.scaled_shape(tf.shape(decoded), side).numpy() / np.array(shape)
    exact = np.array([int(top), int(left)]) / scale
    assert np.all(np.abs(start.numpy() - exact) <= 0.5 + 1e-3)
    assert np.all(np.abs(start.numpy() + extent.numpy() - exact - 224 / scale) <= 1.5)


def test_large_images_decode_downscaled_by_the_jpeg_decoder(photo, monkeypatch):
  """A window at least twice the output: DCT downscaling (ratio 2, 4 or 8), close to the
  reference (the decoder averages pixel blocks instead of the bilinear filter)."""
  array = np.asarray(Image.fromarray(photo).resize((2400, 1600), Image.BILINEAR))
  encoded = _encode(array)
  decoded = tf.io.decode_jpeg(encoded, channels=3)
  ratios = []
  real = tf.io.decode_and_crop_jpeg
  monkeypatch.setattr(tf.io, 'decode_and_crop_jpeg',
                      lambda *args, ratio=1, **kwargs: ratios.append(ratio) or real(
                          *args, ratio=ratio, **kwargs))
  for side in (256, 480):  # scale 0.16 and 0.3 of the 1600-pixel side
    got = pp.crop_first_scale(encoded, 224, side, 10, 20).numpy().astype(float)
    want = pp.scale_and_crop(decoded, 224, side, 10, 20).numpy().astype(float)
    assert np.abs(got - want).mean() < 4.0
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.97  # a window 8 pixels off: 0.84
  assert ratios == [4, 2]


@pytest.mark.parametrize('kind', ['png', 'cmyk', 'grey', 'decoded'])
def test_other_images_take_the_resize_then_crop_path(photo, kind):
  array = np.asarray(Image.fromarray(photo).resize((300, 250), Image.BILINEAR))
  image = {'png': lambda: _encode(array, 'PNG'), 'cmyk': lambda: _encode(array, mode='CMYK'),
           'grey': lambda: _encode(array, mode='L'), 'decoded': lambda: tf.constant(array)}[kind]()
  seed = tf.constant([4, 2], tf.int64)
  out = pp.scale_augment(image, 224, 256, 300, seed).numpy()
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  decoded = pp.decode(image)
  side, top, left = pp.sample_scale_crop(seed, tf.shape(decoded), 224, 256, 300)
  want = pp.scale_and_crop(decoded, 224, side, top, left).numpy().astype(int)
  if kind in ('png', 'decoded'):  # the reference path itself
    assert np.abs(out.astype(int) - want).max() <= 1
  else:  # crop first, JPEG colour conversions of their own
    assert np.abs(out.astype(int) - want).mean() < 4
  if kind == 'grey':
    assert (out[..., 0] == out[..., 2]).all()


def _host_reference(images, mean, std, flips, alphas, offsets, padding, pca):
  """The same augmentation with TensorFlow on the host, from the same random draws."""
  out = []
  for image, flip, alpha, (dy, dx) in zip(images, flips, alphas, offsets):
    x = tf.cast(image, tf.float32) / 255.0
    if padding:
      x = (x - mean) / (std if std is not None else 1.0)
      x = tf.pad(x, [[padding, padding], [padding, padding], [0, 0]])[
          dy:dy + image.shape[0], dx:dx + image.shape[1]]
    if flip:
      x = tf.image.flip_left_right(x)
    if pca:
      x = x + tf.linalg.matvec(tf.constant(pp.IMAGENET_EIGVEC),
                               alpha * pca * tf.constant(pp.IMAGENET_EIGVAL))
    if not padding:
      x = (x - mean) / (std if std is not None else 1.0)
    out.append(x.numpy())
  return np.stack(out)


@pytest.mark.parametrize('kind', ['scale', 'cifar'])
def test_device_augmentation_equals_the_host_reference(kind):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  if kind == 'scale':
    aug = augment.DeviceAugment(mean=np.asarray(pp.IMAGENET_MEAN, np.float32),
                                std=np.asarray(pp.IMAGENET_STD, np.float32), flip=True,
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
  assert jax.device_count() == 8
  config = helpers.small_config(batch_size=16)
  aug = augment.DeviceAugment(mean=np.full(3, 0.5, np.float32), crop_padding=2, flip=True,
                              pca_lighting=0.1, seed=2)
  rng = np.random.default_rng(1)
  batch = {'image': rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  metrics = {}
  for mode in ('jit', 'pmap'):
    config.parallel = mode
    strategy = parallel.create(
        config, lambda axis: models.create_model_from_config(config.model, 10, bn_axis_name=axis),
        optim.create_optimizer(config), optim.schedule_fn(config, 10, 100), (16, 16, 3),
        augment=aug)
    state = strategy.init_state(jax.random.key(0))
    _, m = strategy.train_step(state, strategy.put_batch(batch))
    metrics[mode] = strategy.metrics_to_host(m)
  for key in metrics['jit']:
    np.testing.assert_allclose(metrics['pmap'][key], metrics['jit'][key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize('shape,expected', [((375, 500), (224, 299)), ((500, 375), (299, 224)),
                                            ((224, 600), (224, 320))])
def test_fully_convolutional_testing_puts_the_whole_image_on_a_canvas(shape, expected):
  image = tf.constant(np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8))
  canvas, valid = pp.on_canvas(image, 224)
  assert pp.canvas_size(224) == 320 and canvas.shape == (320, 320, 3) and valid.shape == (320, 320)
  rows, columns = np.nonzero(valid.numpy())
  assert (rows.max() + 1, columns.max() + 1) == expected and rows.min() == columns.min() == 0
  assert not canvas.numpy()[~valid.numpy()].any()  # zeros around the image


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
