"""torchvision weights: converted nets match torchvision's logits; bad state dicts fail whole.

No torch here: tests/data/torchvision_fixture.py recorded torchvision's
logits for seeded numpy weights (tests/data/torchvision_logits.npz); these
tests regenerate the same weights with the same code and convert them.
"""
import functools
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax import torchvision_weights as tw
from tests.data import torchvision_fixture as fixture
from tests.support.state_dicts import write_safetensors

FIXTURE = np.load(fixture.OUTPUT, allow_pickle=False)
# float32 against torchvision's float64 logits: relative to each logit, with an
# absolute floor relative to the largest logit (for logits near zero).
RTOL = 1e-4


def case(name):
  """(arch, num_classes, state dict, NCHW images) of a recorded case, checked
  against the fixture's checksums first: a changed generator is not a bad conversion."""
  arch = str(FIXTURE[f'{name}/arch'])
  num_classes = int(FIXTURE[f'{name}/num_classes'])
  state_dict = fixture.random_torchvision_state_dict(arch, num_classes,
                                                     int(FIXTURE[f'{name}/weights_seed']))
  images = fixture.random_images(tuple(FIXTURE[f'{name}/images_shape']),
                                 int(FIXTURE[f'{name}/images_seed']))
  for what, arrays in (('weights', state_dict), ('images', images)):
    np.testing.assert_allclose(
        fixture.checksum(arrays), FIXTURE[f'{name}/{what}_checksum'], rtol=1e-9,
        err_msg=f'The generator no longer makes the {what} that {fixture.OUTPUT} was recorded '
                f'for (numpy {FIXTURE["numpy_version"]}, now {np.__version__}); rerun '
                f'tests/data/torchvision_fixture.py where torch is installed.')
  return arch, num_classes, state_dict, images


@functools.cache
def resnet18():
  return case('resnet18')


def logits(arch, num_classes, params, batch_stats, images_nchw):
  model = models.create_model(tw.model_name(arch), num_classes, **tw.model_options(arch))
  apply = jax.jit(lambda p, b, x: model.apply({'params': p, 'batch_stats': b}, x, train=False))
  return np.asarray(apply(params, batch_stats, images_nchw.transpose(0, 2, 3, 1)))


def assert_logits_match(ours, name):
  reference = FIXTURE[f'{name}/logits']
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, rtol=RTOL, atol=RTOL * np.abs(reference).max())


def test_fixture_is_small_and_says_what_made_it():
  assert os.path.getsize(fixture.OUTPUT) < 16_000
  assert str(FIXTURE['torch_version']) and str(FIXTURE['torchvision_version'])
  for name in fixture.CASES:
    reference = FIXTURE[f'{name}/logits']
    # Informative logits: O(1), differing across classes and images.
    assert 0.5 < reference.std() < 100, name
    if len(reference) > 1:
      assert np.abs(reference[0] - reference[1]).mean() > 0.1 * reference.std(), name


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_resnet_logits_match_torchvision(name):
  arch, num_classes, state_dict, images = resnet18() if name == 'resnet18' else case(name)
  params, batch_stats = tw.convert(state_dict, arch)
  assert_logits_match(logits(arch, num_classes, params, batch_stats, images), name)


def test_vgg19_logits_match_torchvision_at_224():
  # 143M parameters and 20 GFLOPs: about 5 s and 2 GB here.
  arch, num_classes, state_dict, images = case('vgg19')
  params, batch_stats = tw.convert(state_dict, arch)
  assert batch_stats == {}
  assert_logits_match(logits(arch, num_classes, params, batch_stats, images), 'vgg19')
  # fc1's rows: torch reads the last map's (c, h, w) at c*49 + h*7 + w, we at (h*7 + w)*512 + c.
  kernel, weight = params['fc1']['kernel'], state_dict['classifier.0.weight']
  for c, h, w in [(0, 0, 1), (1, 0, 0), (511, 6, 5), (300, 2, 4)]:
    np.testing.assert_array_equal(kernel[(h * 7 + w) * 512 + c], weight[:, c * 49 + h * 7 + w])


def test_vgg_fc1_rows_follow_the_flatten_order():
  # torch flattens (C, H, W) maps, ours (H, W, C): the same features must meet the same weights.
  rng = np.random.default_rng(0)
  grid = (3, 2, 4)  # C, H, W
  features_nchw = rng.standard_normal((2,) + grid)
  weight = rng.standard_normal((5, int(np.prod(grid))))
  torch_out = features_nchw.reshape(2, -1) @ weight.T
  kernel = tw.fc1_to_flax(weight, grid)
  ours = features_nchw.transpose(0, 2, 3, 1).reshape(2, -1) @ kernel
  np.testing.assert_allclose(ours, torch_out, rtol=1e-12)
  np.testing.assert_array_equal(tw.fc1_to_torch(kernel, grid), weight)


@pytest.mark.parametrize('arch', tw.ARCHITECTURES)
def test_every_architecture_converts_to_the_models_variables(arch):
  # Zero-memory arrays of torchvision's shapes (the fixture script checks these
  # shapes against torchvision's own nets).
  state_dict = {key: np.broadcast_to(np.float32(0), shape)
                for key, shape, _ in fixture.torchvision_layout(arch, 7)}
  params, batch_stats = tw.convert(state_dict, arch)
  model = models.create_model(tw.model_name(arch), 7, **tw.model_options(arch))
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               np.zeros((1,) + tw.INPUT_SHAPE), train=False))
  shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)
  assert shapes(params) == shapes(expected['params'])
  assert shapes(batch_stats) == shapes(expected.get('batch_stats', {}))


def test_model_options_are_torchvisions():
  assert tw.model_options('resnet18') == {'shortcut': 'B'}
  for arch in ('resnet50', 'resnet101', 'resnet152'):
    assert tw.model_options(arch) == {'shortcut': 'B', 'bottleneck_stride': '3x3'}
  assert tw.model_options('vgg19') == {'batch_norm': False}
  assert tw.model_name('vgg19_bn') == 'vgg19'
  assert tw.model_options('vgg19_bn') == {'batch_norm': True}
  with pytest.raises(tw.WeightsError, match='resnet20'):
    tw.model_options('resnet20')


def test_torchvision_architecture_from_a_model_config():
  assert tw.torchvision_architecture({'name': 'resnet50', 'bottleneck_stride': '3x3'}) == 'resnet50'
  assert tw.torchvision_architecture({'name': 'resnet18', 'dtype': 'bfloat16',
                                      'shortcut': None}) == 'resnet18'
  assert tw.torchvision_architecture({'name': 'vgg19', 'batch_norm': True}) == 'vgg19_bn'
  assert tw.torchvision_architecture({'name': 'vgg19', 'batch_norm': None}) == 'vgg19'
  # Same shapes, another function: refused, saying what to set.
  with pytest.raises(tw.WeightsError, match=r"bottleneck_stride='1x1'.*'3x3'"):
    tw.torchvision_architecture({'name': 'resnet50', 'bottleneck_stride': None})
  with pytest.raises(tw.WeightsError, match=r"shortcut='C'"):
    tw.torchvision_architecture({'name': 'resnet34', 'shortcut': 'C'})
  with pytest.raises(tw.WeightsError, match='resnet20'):
    tw.torchvision_architecture({'name': 'resnet20'})


# --- From files (reading them: tests/test_weight_files.py). ----------------------


def test_bfloat16_weights_convert_to_float32():
  arch, _, state_dict, _ = resnet18()
  halved = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
            for k, v in state_dict.items()}
  params, _ = tw.convert(halved, arch)
  kernel = params['stage2_block1']['conv1']['kernel']
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, halved['layer2.0.conv1.weight'].astype(np.float32).transpose(2, 3, 1, 0))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == np.float32 and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_files_round_trip_without_torch(tmp_path, suffix):
  arch, num_classes, state_dict, _ = resnet18()
  path = tmp_path / f'resnet18{suffix}'
  if suffix == '.npz':
    np.savez(path, **state_dict)
  else:
    write_safetensors(path, state_dict)
  loaded = tw.load_state_dict(path)
  assert list(loaded) == list(state_dict)
  for key, value in state_dict.items():
    assert loaded[key].dtype == value.dtype
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  assert_trees_equal(tw.load(path, {'name': 'resnet18'}), tw.convert(state_dict, arch))


# --- Bad state dicts: an error naming the keys, nothing converted. ---------------


@pytest.fixture
def count_conversions(monkeypatch):
  """How many arrays `convert` has converted: none, when it raises."""
  calls = []
  original = tw._to_flax
  monkeypatch.setattr(tw, '_to_flax', lambda *args: calls.append(1) or original(*args))
  return calls


def fails_whole(state_dict, arch, count_conversions, **kwargs):
  before = list(state_dict)
  with pytest.raises(tw.WeightsError) as raised:
    tw.convert(state_dict, arch, **kwargs)
  assert not count_conversions  # validated before building anything
  assert list(state_dict) == before  # the caller's dict is untouched
  assert isinstance(raised.value, ValueError)
  return raised.value


def test_missing_key(count_conversions):
  arch, _, state_dict, _ = resnet18()
  state_dict = dict(state_dict)
  del state_dict['layer2.0.downsample.1.running_var']
  error = fails_whole(state_dict, arch, count_conversions)
  assert error.missing == ('layer2.0.downsample.1.running_var',) and not error.unexpected
  assert '1 missing keys: layer2.0.downsample.1.running_var' in str(error)


def test_extra_key(count_conversions):
  arch, _, state_dict, _ = resnet18()
  state_dict = {**state_dict, 'layer1.0.conv3.weight': np.zeros((64, 64, 1, 1), np.float32),
                'fc.num_batches_tracked': np.array(0)}  # a counter where there is no BN
  error = fails_whole(state_dict, arch, count_conversions)
  assert error.unexpected == ('layer1.0.conv3.weight', 'fc.num_batches_tracked')
  assert 'unexpected keys: layer1.0.conv3.weight, fc.num_batches_tracked' in str(error)


def test_wrong_shape(count_conversions):
  arch, _, state_dict, _ = resnet18()
  state_dict = dict(state_dict)
  state_dict['layer3.1.conv2.weight'] = state_dict['layer3.1.conv2.weight'][:, :, :2]
  state_dict['layer4.0.bn1.bias'] = np.zeros((3,), np.float32)
  error = fails_whole(state_dict, arch, count_conversions)
  assert error.mismatched == ('layer3.1.conv2.weight', 'layer4.0.bn1.bias')
  assert ('layer3.1.conv2.weight: shape (256, 256, 2, 3), expected (256, 256, 3, 3)'
          in str(error))
  assert 'layer4.0.bn1.bias: shape (3,), expected (512,)' in str(error)


def test_wrong_dtype_or_not_an_array(count_conversions):
  arch, _, state_dict, _ = resnet18()
  state_dict = {**state_dict, 'bn1.weight': np.ones(64, np.int32), 'fc.bias': 'oops'}
  error = fails_whole(state_dict, arch, count_conversions)
  assert 'bn1.weight: dtype int32' in str(error)
  assert 'fc.bias: shape ()' in str(error)


def test_another_num_classes(count_conversions):
  arch, _, state_dict, _ = resnet18()
  error = fails_whole(state_dict, arch, count_conversions, num_classes=1000)
  assert error.mismatched == ('fc.weight', 'fc.bias')
  assert 'fc.weight: shape (10, 512), expected (1000, 512) for num_classes=1000' in str(error)


def shaped(arch):
  """A state dict with torchvision's keys for `arch` (tiny values: keys are checked first)."""
  return {key: np.zeros(1, np.float32) for key, _, _ in fixture.torchvision_layout(arch, 10)}


@pytest.mark.parametrize('given, asked', [('resnet50', 'resnet18'), ('resnet18', 'resnet34'),
                                          ('resnet152', 'resnet101'), ('vgg19_bn', 'vgg19'),
                                          ('vgg19', 'resnet50')])
def test_another_architecture_is_named(given, asked, count_conversions):
  error = fails_whole(shaped(given), asked, count_conversions)
  assert f"its keys look like torchvision's {given} (convert it as '{given}'" in str(error)
  assert error.missing or error.unexpected
  for key in (error.missing + error.unexpected)[:3]:
    assert key in str(error)


def vgg_keys(cfg, batch_norm):
  """torchvision's VGG keys for a `features` config (widths, 'M' for a max pool)."""
  keys, index = [], 0
  for width in cfg:
    if width == 'M':
      index += 1
      continue
    keys += [f'features.{index}.weight', f'features.{index}.bias']
    if batch_norm:
      keys += [f'features.{index + 1}.{name}'
               for name in ('weight', 'bias', 'running_mean', 'running_var')]
    index += 3 if batch_norm else 2
  return keys + [f'classifier.{i}.{name}' for i in (0, 3, 6) for name in ('weight', 'bias')]


def test_other_torchvision_nets_are_recognised():
  vgg16 = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']
  vgg11 = [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M']
  assert tw.guess_architecture(vgg_keys(vgg16, False)) == 'vgg16'
  assert tw.guess_architecture(vgg_keys(vgg16, True)) == 'vgg16_bn'
  assert tw.guess_architecture(vgg_keys(vgg11, True)) == 'vgg11_bn'
  assert tw.guess_architecture(vgg_keys(fixture.VGG19_CFG, False)) == 'vgg19'
  assert tw.guess_architecture(shaped('vgg19_bn')) == 'vgg19_bn'
  for arch in fixture.RESNET_BLOCKS:
    assert tw.guess_architecture(shaped(arch)) == arch
  resnet = [key for key in shaped('resnet18') if not key.startswith('layer4.1.')]
  assert tw.guess_architecture(resnet) == 'a ResNet with basic blocks (2, 2, 2, 1)'
  assert tw.guess_architecture(['weight', 'bias']) is None
  with pytest.raises(tw.WeightsError, match="look like torchvision's vgg16_bn.*missing keys"):
    tw.convert(dict.fromkeys(vgg_keys(vgg16, True), np.zeros(1)), 'vgg19_bn')


def test_data_parallel_prefix_is_explained(count_conversions):
  state_dict = {f'module.{key}': value for key, value in shaped('resnet18').items()}
  error = fails_whole(state_dict, 'resnet18', count_conversions)
  assert "every key starts with 'module.'" in str(error) and 'resnet18' in str(error)


def test_bn_counters_are_optional():
  arch, _, state_dict, _ = resnet18()
  without = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  assert len(without) < len(state_dict)
  assert_trees_equal(tw.convert(without, arch), tw.convert(state_dict, arch))


def test_back_to_torchvision_in_its_order():
  arch, _, state_dict, _ = resnet18()
  back = tw.to_torchvision(*tw.convert(state_dict, arch), arch)
  expected = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  assert list(back) == list(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # Every net's variables are listed in torchvision's order (converting VGG takes seconds).
  for arch in tw.ARCHITECTURES:
    assert [entry.key for entry in tw._layout(arch, 3)] == [
        key for key, _, kind in fixture.torchvision_layout(arch, 3) if kind != 'count']


def test_same_keys_other_widths(count_conversions):
  # torchvision's wide_resnet50_2 has resnet50's keys; tiny values stand in for its shapes.
  error = fails_whole(shaped('resnet50'), 'resnet50', count_conversions)
  assert "keys of torchvision's resnet50 but 267 entries do not fit it" in str(error)
  assert 'wide_resnet' in str(error)
  assert 'conv1.weight: shape (1,), expected (64, 3, 7, 7)' in str(error)


def test_torchvision_weights_start_a_run_and_evaluate(tmp_path, digits_dir):
  """config.init_from: a new run starts from the converted weights; --mode=eval in a workdir
  without checkpoints evaluates them."""
  from tests.support import helpers  # pylint: disable=import-outside-toplevel
  weights = tmp_path / 'resnet18.npz'
  state_dict = fixture.random_torchvision_state_dict('resnet18', 10, seed=5)
  np.savez(weights, **state_dict)
  common = ['--config=configs/default.py', f'--config.data.data_dir={digits_dir}',
            '--config.model.name=resnet18',
            f'--config.init_from={weights}', '--config.data.normalize=imagenet_mean_std',
            '--config.eval_batch_size=120']
  out = helpers.run_py('--mode=eval', f'--workdir={tmp_path / "eval"}', *common)
  result = json.loads(out.stdout[out.stdout.index('{'):])
  assert result['step'] == 0 and result['checkpoint'] == str(weights)
  assert result['num_examples'] == 360 and 0 <= result['top1_error'] <= 1
  helpers.run_py(f'--workdir={tmp_path / "train"}', *common, '--config.num_train_steps=1',
                 '--config.batch_size=16', '--config.optimizer.learning_rate=0.0',
                 '--config.checkpoint_every_steps=1')
  from tests.test_checkpoints import saved_state  # pylint: disable=import-outside-toplevel
  _, state = saved_state(tmp_path / 'train')
  params, _ = tw.convert(state_dict, 'resnet18')
  # One step at learning rate 0 changes no weight: they are the converted ones.
  np.testing.assert_array_equal(state['params']['stage2_block1']['conv1']['kernel'],
                                params['stage2_block1']['conv1']['kernel'])
  np.testing.assert_array_equal(state['params']['head']['kernel'], params['head']['kernel'])


def test_evaluating_weights_with_another_classifier_is_refused(tmp_path, digits_dir):
  """A 1000-class classifier on a 10-class data set: training replaces it by a fresh one;
  evaluating would score a random classifier, so --mode=eval stops and says why."""
  from tests.support import helpers  # pylint: disable=import-outside-toplevel
  weights = tmp_path / 'resnet18.npz'
  np.savez(weights, **fixture.random_torchvision_state_dict('resnet18', 1000, seed=5))
  result = helpers.run_py('--mode=eval', f'--workdir={tmp_path / "eval"}',
                          '--config=configs/default.py', f'--config.data.data_dir={digits_dir}',
                          '--config.model.name=resnet18', f'--config.init_from={weights}',
                          check=False)
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert 'its classifier has 1000 classes and sklearn_digits 10' in result.stderr
  assert 'random classifier' in result.stderr


def test_weights_that_do_not_fit_the_configured_net_name_the_variables():
  """E.g. VGG-19's first dense layer, whose shape follows data.image_size."""
  from resnet_jax import assembly  # pylint: disable=import-outside-toplevel
  expected = {'params': {'fc1': {'kernel': np.zeros((512, 4096))}, 'head': {'bias': np.zeros(3)}}}
  loaded = {'params': {'fc1': {'kernel': np.zeros((25088, 4096))}, 'head': {'bias': np.zeros(3)},
                       'extra': np.zeros(1)}}
  with pytest.raises(tw.WeightsError) as raised:
    assembly.check_shapes('vgg.npz', 'vgg19', loaded, expected)
  message = str(raised.value)
  assert "vgg.npz does not fit the configured vgg19" in message
  assert "['params']['fc1']['kernel']: (25088, 4096) instead of (512, 4096)" in message
  assert "['params']['extra']: not in this net" in message
  assembly.check_shapes('vgg.npz', 'vgg19', expected, expected)
