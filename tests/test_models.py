"""The paper's networks: exact parameter counts, multiply-adds, shortcuts, BN."""
import os
import re
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


def test_batch_norm_normalises_and_its_running_statistics_track_the_data():
  """Train mode standardises each batch; the running statistics converge to the data's own,
  so that eval mode standardises new data from the same distribution."""
  bn = models.BatchNorm(use_running_average=False, momentum=0.9)
  draw = lambda i: 3.0 + 2.0 * jax.random.normal(jax.random.key(i), (64, 4, 4, 5))
  variables = bn.init(jax.random.key(0), draw(0))
  y, updates = bn.apply(variables, draw(0), mutable=['batch_stats'])
  np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var((0, 1, 2)), 1.0, atol=1e-3)
  # One step moves the running mean a tenth of the way from 0 towards 3, not nine tenths.
  assert 0.25 < float(updates['batch_stats']['mean'].mean()) < 0.35
  for i in range(1, 80):
    _, updates = bn.apply({**variables, **updates}, draw(i), mutable=['batch_stats'])
  np.testing.assert_allclose(updates['batch_stats']['mean'], 3.0, atol=0.05)
  np.testing.assert_allclose(updates['batch_stats']['var'], 4.0, rtol=0.03)
  evaluate = models.BatchNorm(use_running_average=True)
  out = evaluate.apply({**variables, **updates}, draw(1000))
  np.testing.assert_allclose(out.mean((0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(out.std((0, 1, 2)), 1.0, atol=0.05)


def test_ghost_batch_norm_equals_normalising_each_group_alone():
  x = jax.random.normal(jax.random.key(0), (12, 4, 4, 3)) * jnp.arange(1, 13)[:, None, None, None]
  ghost = models.BatchNorm(use_running_average=False, group_size=4)
  plain = models.BatchNorm(use_running_average=False)
  variables = plain.init(jax.random.key(0), x)
  y, ghost_stats = ghost.apply(variables, x, mutable=['batch_stats'])
  parts = [plain.apply(variables, x[i:i + 4], mutable=['batch_stats']) for i in range(0, 12, 4)]
  np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-5)
  # The running statistics average the groups' statistics.
  for key in ('mean', 'var'):
    expected = np.mean([p[1]['batch_stats'][key] for p in parts], axis=0)
    np.testing.assert_allclose(ghost_stats['batch_stats'][key], expected, rtol=1e-5)
  with pytest.raises(ValueError, match='does not divide the batch'):
    models.BatchNorm(use_running_average=False, group_size=5).apply(
        variables, x, mutable=['batch_stats'])


@pytest.mark.parametrize('group_size', [0, 4])
def test_fast_variance_batch_norm_matches_two_passes_with_one_collective(group_size):
  # Per-channel means of a few units, as after a conv; 2 "devices" via vmap.
  x = (jax.random.normal(jax.random.key(0), (2, 8, 4, 4, 3)) * jnp.array([1.0, 0.5, 2.0])
       + jnp.array([3.0, -1.0, 0.0]))
  results, collectives, jaxprs = {}, {}, {}
  for fast in (False, True):
    bn = models.BatchNorm(use_running_average=False, group_size=group_size, axis_name='d',
                          fast_variance=fast)
    variables = bn.init(jax.random.key(0), x[0])
    apply = jax.vmap(lambda v, bn=bn, variables=variables: bn.apply(
        variables, v, mutable=['batch_stats']), axis_name='d')
    results[fast] = apply(x)
    jaxprs[fast] = str(jax.make_jaxpr(apply)(x))
    collectives[fast] = jaxprs[fast].count('psum')
  (y2, stats2), (y1, stats1) = results[False], results[True]
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(stats1['batch_stats'][key], stats2['batch_stats'][key],
                               rtol=1e-5, atol=1e-6)
  # Whole-batch sync: mean and E[x^2] in one collective instead of two; ghost BN
  # syncs only the running statistics, in one collective either way.
  assert collectives == {False: 2 if group_size == 0 else 1, True: 1}, collectives
  assert jaxprs[True] != jaxprs[False]  # the option reaches the computation


def test_fast_variance_is_the_default_off_cpus_only(monkeypatch):
  def fast(**options):
    net = models.create_model('resnet20', 10, **options)
    return models.batch_norm(net, train=True).keywords['fast_variance']
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert (fast(), fast(bn_fast_variance=True)) == (False, True)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert (fast(), fast(bn_fast_variance=False)) == (True, False)


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


def test_store_is_an_exact_identity_with_identity_gradient():
  for channels, flag in ((16, True), (64, False)):
    x = jax.random.normal(jax.random.key(channels), (2, 3, 3, channels))
    flag = jnp.asarray(flag)
    np.testing.assert_array_equal(models.store(x, flag), x)
    np.testing.assert_array_equal(jax.jit(models.store)(x, flag), x)
    g = jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_array_equal(jax.vjp(models.store, x, flag)[1](g)[0], g)


def _resnet20_loss_and_grad(store, x, **options):
  """Jitted (loss, logits), grads of ResNet-20 in training mode, and its parameters."""
  labels = jnp.arange(x.shape[0]) % 10
  model = models.create_model('resnet20', 10, materialize_blocks=store, **options)
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels]), logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True)), variables['params']


def test_stored_activations_stay_conditionals_in_the_compiled_cpu_step():
  """The speed-up needs XLA to keep the conditionals (a fusion barrier) on CPU."""
  counts = []
  for store in (False, True):
    fn, params = _resnet20_loss_and_grad(store, jnp.zeros((2, 16, 16, 3)))
    counts.append(fn.lower(params).compile().as_text().count(' conditional('))
  # The stem output, then per block the first ReLU output and the block output.
  assert counts == [0, 1 + 2 * 9]


def test_materialized_blocks_compute_the_same_function():
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  results = []
  for store in (False, True):
    fn, params = _resnet20_loss_and_grad(store, x)
    results.append(fn(params))
  ((_, logits_a), grads_a), ((_, logits_b), grads_b) = results
  np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_a,
               grads_b)


CONV_DIMS = ('NHWC', 'HWIO', 'NHWC')
NARROW_PADDED = models.NARROW_CONV_PADDED_FEATURES


def _conv_output_shapes(jaxpr):
  return re.findall(r'(\w+\[[\d,]*\]) = conv_general_dilated', str(jaxpr))


@pytest.mark.parametrize('kernel_shape,padded,kwargs', [
    ((3, 3, 16, 16), True, {}),     # CIFAR stage 1
    ((3, 3, 16, 16), True, {'window_strides': (2, 2)}),
    ((3, 3, 16, 16), True, {'padding': 'SAME', 'rhs_dilation': (2, 2)}),
    ((1, 1, 16, 8), True, {'padding': 'VALID'}),
    ((3, 3, 16, 32), False, {'window_strides': (2, 2)}),  # YNNPACK takes it already
    ((3, 3, 3, 16), False, {}),     # the stem: padding 3 features to 20 would cost more
    ((3, 3, 8, 16), False, {'feature_group_count': 2}),
    ((3, 3, 16, 16), False, {'dtype': jnp.bfloat16}),
])
def test_narrow_conv_padded_is_the_same_convolution(kernel_shape, padded, kwargs):
  kwargs = {'window_strides': (1, 1), 'padding': ((1, 1), (1, 1)), **kwargs}
  dtype = kwargs.pop('dtype', jnp.float32)
  strides, padding = kwargs.pop('window_strides'), kwargs.pop('padding')
  groups = kwargs.get('feature_group_count', 1)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, kernel_shape[2] * groups), dtype)
  w = jax.random.normal(jax.random.key(1), kernel_shape, dtype)

  def loss(conv):
    def fn(x, w):
      y = conv(x, w, strides, padding, dimension_numbers=CONV_DIMS, **kwargs)
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
    return jax.value_and_grad(fn, (0, 1), has_aux=True)

  (_, y_ref), grads_ref = jax.jit(loss(jax.lax.conv_general_dilated))(x, w)
  (_, y), grads = jax.jit(loss(models.narrow_conv_padded))(x, w)
  # Float32 rounding only: the sums run in another order (and the gradients
  # take cos(y) of that y).
  for a, ref in ((y, y_ref), *zip(grads, grads_ref)):
    assert a.shape == ref.shape and a.dtype == ref.dtype
    a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  shapes = _conv_output_shapes(jax.make_jaxpr(loss(models.narrow_conv_padded))(x, w))
  if padded:  # forward and input gradient padded to 20 features, kernel gradient not
    dx_shape = f'f32[4,8,8,{NARROW_PADDED}]'
    assert dx_shape in shapes and 'f32[%d,%d,%d,%d]' % kernel_shape in shapes, shapes
    assert not any(f',{NARROW_PADDED},' in s for s in shapes if s != dx_shape), shapes
  else:
    assert not any(str(NARROW_PADDED) in s for s in shapes), shapes
  # Forward mode too (jvp, jacfwd, hessian).
  jax.jvp(lambda x: models.narrow_conv_padded(x, w, strides, padding,
                                              dimension_numbers=CONV_DIMS, **kwargs),
          (x,), (x,))


def test_narrow_conv_padded_leaves_channels_first_convs_alone():
  x, w = jnp.ones((1, 4, 5, 5)), jnp.ones((16, 16, 3, 3))  # NCHW, OIHW: 16 x 16 in the kernel
  w_odd = jnp.ones((4, 4, 16, 16))  # OIHW with spatial dims of 16: not features
  for lhs, rhs in ((jnp.ones((1, 16, 5, 5)), w), (x, w_odd)):
    np.testing.assert_array_equal(models.narrow_conv_padded(lhs, rhs, (1, 1), 'SAME'),
                                  jax.lax.conv_general_dilated(lhs, rhs, (1, 1), 'SAME'))


def _entry_convolutions(compiled_text):
  """Convolutions XLA:CPU runs on its Eigen path: those not inside a (YNNPACK) fusion."""
  entry = compiled_text[compiled_text.index('\nENTRY'):]
  return entry.count(' convolution(')


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU kernel choice')
def test_padded_narrow_convs_move_stage_one_to_the_fast_kernels_with_the_same_function():
  """Also a canary: it fails if XLA:CPU changes which convs its YNNPACK kernels take."""
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  results, eigen_convs = [], []
  for pad in (False, True):
    fn, params = _resnet20_loss_and_grad(True, x, pad_narrow_convs=pad, onednn_convs=False)
    eigen_convs.append(_entry_convolutions(fn.lower(params).compile().as_text()))
    results.append(fn(params))
  # Stage 1's six convs, forward and input gradient, leave the Eigen path.
  assert eigen_convs[0] - eigen_convs[1] == 12
  ((_, logits_a), grads_a), ((_, logits_b), grads_b) = results
  np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5 * np.abs(logits_a).max())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5 * np.abs(a).max()),
               grads_a, grads_b)


@pytest.mark.parametrize('backend,cores_per_device,padded', [
    ('cpu', 1, True), ('cpu', 0.25, True), ('cpu', 2, False), ('gpu', 1, False)])
def test_padded_narrow_convs_default_to_cpus_with_a_core_per_device(
    monkeypatch, backend, cores_per_device, padded):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(models, 'cpu_cores_per_device', lambda: cores_per_device)
  model = models.create_model('resnet20', 10, onednn_convs=False)
  x = jnp.zeros((1, 8, 8, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))
  assert ('f32[1,8,8,20]' in jaxpr) == padded


def test_cpu_cores_per_device_counts_this_process_cores(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3}, raising=False)
  assert models.cpu_cores_per_device() == 4 / jax.local_device_count()
