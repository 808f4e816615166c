"""The paper's networks: exact parameter counts, multiply-adds, shortcuts, BN."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models, summary

CIFAR = (32, 32, 3)
IMAGENET = (224, 224, 3)

# Computed with resnet_jax.summary (BN scale/bias included, running statistics
# excluded); the paper's Table 6 gives 0.27M/0.46M/0.66M/0.85M/1.7M/19.4M.
CIFAR_PARAMS = {
    'resnet20': 269_722, 'resnet32': 464_154, 'resnet44': 658_586,
    'resnet56': 853_018, 'resnet110': 1_727_962, 'resnet1202': 19_421_274,
}
PAPER_CIFAR_MILLIONS = {
    'resnet20': 0.27, 'resnet32': 0.46, 'resnet44': 0.66, 'resnet56': 0.85,
    'resnet110': 1.7, 'resnet1202': 19.4,
}
# The widely used reference counts (torchvision), option B shortcuts.
IMAGENET_PARAMS = {
    'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
    'resnet101': 44_549_160, 'resnet152': 60_192_808,
}
# The paper's Table 1 FLOPs (multiply-adds) at 224x224, and VGG-19's Fig. 3 figure.
PAPER_GMACS = {
    'resnet18': 1.8, 'resnet34': 3.6, 'resnet50': 3.8, 'resnet101': 7.6,
    'resnet152': 11.3, 'vgg19': 19.6,
}


def params_of(name, input_shape, num_classes, **options):
  return summary.num_trainable_params(models.create_model(name, num_classes, **options), input_shape)


@pytest.mark.parametrize('name', sorted(CIFAR_PARAMS))
def test_cifar_parameter_counts(name):
  count = params_of(name, CIFAR, 10)
  assert count == CIFAR_PARAMS[name]
  assert round(count / 1e6, 2 if count < 1e6 else 1) == PAPER_CIFAR_MILLIONS[name]


@pytest.mark.parametrize('name', sorted(IMAGENET_PARAMS))
def test_imagenet_parameter_counts(name):
  assert params_of(name, IMAGENET, 1000) == IMAGENET_PARAMS[name]


def test_plain_and_vgg_parameter_counts():
  # Plain nets are the residual ones minus the shortcuts' parameters.
  assert params_of('plain20', CIFAR, 10) == CIFAR_PARAMS['resnet20']  # option A is parameter-free
  assert params_of('plain56', CIFAR, 10) == CIFAR_PARAMS['resnet56']
  assert params_of('plain110', CIFAR, 10) == CIFAR_PARAMS['resnet110']
  assert params_of('plain34', IMAGENET, 1000) == params_of('resnet34', IMAGENET, 1000, shortcut='A')
  assert params_of('plain34', IMAGENET, 1000) == 21_623_848
  assert params_of('vgg19', IMAGENET, 1000) == 143_667_240
  assert params_of('vgg19', IMAGENET, 1000, batch_norm=True) == 143_678_248


def test_shortcut_options_change_counts_as_expected():
  base = params_of('resnet34', IMAGENET, 1000, shortcut='A')
  # B: three projections (64->128, 128->256, 256->512) with their BN.
  b = sum(cin * cout + 2 * cout for cin, cout in [(64, 128), (128, 256), (256, 512)])
  assert params_of('resnet34', IMAGENET, 1000, shortcut='B') == base + b
  # C: a projection on every one of the 16 blocks.
  blocks = [(64, 64)] * 3 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 5 + [
      (256, 512)] + [(512, 512)] * 2
  c = sum(cin * cout + 2 * cout for cin, cout in blocks)
  assert params_of('resnet34', IMAGENET, 1000, shortcut='C') == base + c


@pytest.mark.parametrize('name', sorted(PAPER_GMACS))
def test_multiply_adds_match_the_paper(name):
  macs = summary.multiply_adds(models.create_model(name, 1000), IMAGENET)
  assert abs(macs / 1e9 - PAPER_GMACS[name]) / PAPER_GMACS[name] < 0.05


def test_plain34_costs_what_resnet34_costs():
  plain = summary.multiply_adds(models.create_model('plain34', 1000), IMAGENET)
  assert plain == summary.multiply_adds(models.create_model('resnet34', 1000, shortcut='A'), IMAGENET)
  resnet_b = summary.multiply_adds(models.create_model('resnet34', 1000), IMAGENET)
  assert plain < resnet_b < plain * 1.01  # B's three projections add about 0.5%


def test_bottleneck_stride_placement():
  def strides(option):
    rows = summary.layers(models.create_model('resnet50', 1000, bottleneck_stride=option), IMAGENET)
    return {r.path: r.strides for r in rows if r.path.startswith('stage2_block1/')}
  assert strides('1x1') == {'stage2_block1/conv1': '2', 'stage2_block1/conv2': '1',
                            'stage2_block1/conv3': '1', 'stage2_block1/shortcut/conv': '2'}
  assert strides('3x3') == {'stage2_block1/conv1': '1', 'stage2_block1/conv2': '2',
                            'stage2_block1/conv3': '1', 'stage2_block1/shortcut/conv': '2'}
  v15 = summary.multiply_adds(models.create_model('resnet50', 1000, bottleneck_stride='3x3'), IMAGENET)
  assert 4.0e9 < v15 < 4.2e9  # the commonly quoted 4.1 GMACs of "v1.5"


def _projection_blocks(name, **options):
  params = summary.variable_shapes(models.create_model(name, 1000, **options), (64, 64, 3))['params']
  return sorted(k for k, v in params.items() if 'shortcut' in v)


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad():
  assert _projection_blocks('resnet20') == []
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  shortcut = models.Shortcut(32, 2, 'A', conv=nn.Conv, norm=None)
  variables = shortcut.init(jax.random.key(1), x)
  assert jax.tree.leaves(variables) == []
  y = shortcut.apply(variables, x)
  assert y.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., 16:], 0.0)
  # Where the shape does not change, A is the identity.
  same = models.Shortcut(16, 1, 'A', conv=nn.Conv, norm=None)
  np.testing.assert_array_equal(same.apply({}, x), x)


def test_option_b_projects_only_where_shape_changes_and_c_everywhere():
  assert _projection_blocks('resnet18') == ['stage2_block1', 'stage3_block1', 'stage4_block1']
  # Bottleneck nets also change width (64 -> 256) at the first block.
  assert _projection_blocks('resnet50') == ['stage1_block1', 'stage2_block1', 'stage3_block1',
                                            'stage4_block1']
  assert len(_projection_blocks('resnet18', shortcut='C')) == 8
  assert len(_projection_blocks('resnet20', shortcut='C')) == 9
  assert _projection_blocks('resnet20', shortcut='B') == ['stage2_block1', 'stage3_block1']
  assert _projection_blocks('plain18') == []


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_output_shapes_for_every_name(name):
  model = models.create_model(name, 7)
  imagenet_family = {f'resnet{d}' for d in models.IMAGENET_STAGES} | {
      f'plain{d}' for d in models.IMAGENET_PLAIN_DEPTHS}
  size = 64 if name in imagenet_family else 32
  x = jnp.zeros((2, size, size, 3))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False)[0])
  assert out.shape == (2, 7) and out.dtype == jnp.float32


@pytest.mark.parametrize('name,size', [('resnet20', 32), ('plain20', 32), ('resnet18', 64),
                                       ('resnet50', 64)])
def test_forward_pass_and_batch_stats_update(name, size):
  model = models.create_model(name, 10)
  x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         updates['batch_stats'])
  assert all(jax.tree.leaves(changed))
  eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert eval_logits.shape == (4, 10)


@pytest.mark.parametrize('name,shape,path', [
    ('resnet20', CIFAR, ('stage2_block1', 'conv1')),  # 3x3, 16 -> 32: fan-out twice fan-in
    ('resnet18', (64, 64, 3), ('stem_conv',)),        # 7x7, 3 -> 64: fan-out 21x fan-in
])
def test_conv_init_is_he_fan_out_normal(name, shape, path):
  """std sqrt(2 / fan_out), fan_out = k*k*out (He et al.), not fan-in's sqrt(2 / (k*k*in))."""
  params = models.create_model(name, 10).init(jax.random.key(0), jnp.zeros((1,) + shape),
                                              train=False)['params']
  kernel = params
  for key in path:
    kernel = kernel[key]
  kernel = np.asarray(kernel['kernel'])
  kh, kw, fan_in_features, out_features = kernel.shape
  fan_out, fan_in = kh * kw * out_features, kh * kw * fan_in_features
  assert fan_out >= 2 * fan_in
  assert abs(kernel.std() - np.sqrt(2.0 / fan_out)) / np.sqrt(2.0 / fan_out) < 0.05
  assert abs(kernel.mean()) < 0.1 * kernel.std()
  assert np.abs(kernel).max() > 3 * kernel.std()  # untruncated (a 2-sigma truncation is common)
  assert params['stage1_block1']['bn2']['scale'].min() == 1.0


def test_zero_init_last_bn_makes_blocks_start_as_identity():
  model = models.create_model('resnet20', 10, zero_init_last_bn=True)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  assert float(jnp.abs(variables['params']['stage2_block2']['bn2']['scale']).max()) == 0.0
  assert float(variables['params']['stage2_block2']['bn1']['scale'].min()) == 1.0


def test_bfloat16_computes_in_bfloat16_with_float32_params():
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  f32 = models.create_model('resnet20', 10)
  bf16 = models.create_model('resnet20', 10, dtype='bfloat16')
  variables = f32.init(jax.random.key(1), x, train=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16.init(jax.random.key(1), x, train=False))} == {
      jnp.dtype('float32')}
  ref, _ = f32.apply(variables, x, train=True, mutable=['batch_stats'])
  out, stats = bf16.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(stats)} == {jnp.dtype('float32')}
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))
  jaxpr = str(jax.make_jaxpr(lambda v: bf16.apply(v, x, train=False))(variables))
  assert 'bf16[4,32,32,16]' in jaxpr


def test_fast_variance_is_the_trainers_default_off_cpus_only():
  """The model's own default is the exact two-pass variance; the trainer picks one pass on
  accelerators (backend.model_defaults), unless the config says otherwise."""
  from ml_collections import ConfigDict  # pylint: disable=import-outside-toplevel
  from resnet_jax import backend  # pylint: disable=import-outside-toplevel
  fast = lambda net: models.batch_norm(net, train=True).keywords['fast_variance']
  assert fast(models.create_model('resnet20', 10)) is False
  unset, two_pass = ConfigDict({'bn_fast_variance': None}), ConfigDict({'bn_fast_variance': False})
  assert backend.model_defaults(unset, 'cpu') == {'bn_fast_variance': False}
  assert backend.model_defaults(unset, 'gpu') == {'bn_fast_variance': True}
  assert backend.model_defaults(unset, 'tpu') == {'bn_fast_variance': True}
  assert backend.model_defaults(two_pass, 'gpu') == {}
  net = models.create_model_from_config(ConfigDict({'name': 'resnet20', 'bn_fast_variance': None}),
                                        10, **backend.model_defaults(unset, 'gpu'))
  assert fast(net) is True


def test_ghost_batch_norm_in_a_network():
  model = models.create_model('resnet20', 10, bn_group_size=2)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  whole, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  halves = [model.apply(variables, x[i:i + 2], train=True, mutable=['batch_stats'])[0]
            for i in (0, 2)]
  np.testing.assert_allclose(whole, jnp.concatenate(halves), rtol=1e-4, atol=1e-5)


def test_registry_errors_list_the_valid_choices():
  with pytest.raises(ValueError, match='Unknown model .resnet21.*resnet20, resnet32'):
    models.create_model('resnet21', 10)
  with pytest.raises(ValueError, match="shortcut='D' is not valid.*A, B, C"):
    models.create_model('resnet20', 10, shortcut='D')
  with pytest.raises(ValueError, match="Option 'shortcut' does not apply to plain20.*Valid options"):
    models.create_model('plain20', 10, shortcut='A')
  with pytest.raises(ValueError, match="Option 'bottleneck_stride' does not apply to resnet18"):
    models.create_model('resnet18', 10, bottleneck_stride='3x3')
  with pytest.raises(ValueError, match="dtype='float16' is not valid.*bfloat16"):
    models.create_model('resnet20', 10, dtype='float16')
  with pytest.raises(ValueError, match="Option 'dropout' does not apply"):
    models.create_model('vgg19', 10, dropout=0.5)
  # None means "the family's default".
  assert models.create_model('resnet20', 10, shortcut=None).shortcut == 'A'
  assert models.create_model('resnet18', 10).shortcut == 'B'


def test_models_import_without_tensorflow_tfds_or_clu():
  code = ('import sys\n'
          'class Block:\n'
          '  def find_spec(self, name, path=None, target=None):\n'
          '    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):\n'
          '      raise ImportError("blocked " + name)\n'
          'sys.meta_path.insert(0, Block())\n'
          'from resnet_jax import models, summary\n'
          'print(summary.num_trainable_params(models.create_model("resnet20", 10), (32, 32, 3)))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '269722'


def test_a_model_lowers_to_plain_xla_and_depends_only_on_its_fields(monkeypatch):
  """No custom calls and no conditionals, whatever the backend or the host's cores say."""
  x = jnp.zeros((2, 16, 16, 3))
  texts = []
  for backend, cores in (('cpu', {0}), ('gpu', {0, 1, 2, 3})):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, cores=cores: cores, raising=False)
    model = models.create_model('resnet20', 10)
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params, model=model, variables=variables):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.sum(logits ** 2)
    texts.append(jax.jit(jax.grad(loss)).lower(variables['params']).as_text())
  assert texts[0] == texts[1]
  assert 'custom_call' not in texts[0] and 'stablehlo.case' not in texts[0]
  assert 'stablehlo.if' not in texts[0] and 'stablehlo.convolution' in texts[0]


def test_models_import_no_cpu_plugin():
  code = ('import sys\n'
          'from resnet_jax import models, summary\n'
          'models.create_model("resnet20", 10)\n'
          'print(sorted(m for m in sys.modules if m.startswith("resnet_jax")))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert eval(out.stdout) == ['resnet_jax', 'resnet_jax.batch_norm',  # pylint: disable=eval-used
                              'resnet_jax.errors', 'resnet_jax.models', 'resnet_jax.summary']


def test_the_injected_convolution_computes_every_conv_layer():
  calls = []

  def counting_conv(*args, **kwargs):
    calls.append(args[1].shape)
    return jax.lax.conv_general_dilated(*args, **kwargs)

  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  plain = models.create_model('resnet20', 10)
  hooked = models.create_model('resnet20', 10, conv_general_dilated=counting_conv)
  variables = plain.init(jax.random.key(1), x, train=False)
  np.testing.assert_array_equal(hooked.apply(variables, x, train=False),
                                plain.apply(variables, x, train=False))
  assert len(calls) == 19 and calls[0] == (3, 3, 3, 16)  # the stem and 18 block convs
