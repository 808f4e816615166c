"""The CPU plugin (resnet_jax/cpu): the same convolution as lax, on oneDNN, per batch shard;
chosen once by the trainer, with a fallback where it cannot run.

These tests skip, saying why, where the plugin cannot run: not x86-64, a jaxlib
whose internal call is not validated, and (for the kernel gradients) no C++
compiler or no oneDNN packages (pip install '.[cpu]').
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import backend, cpu, errors, models
from resnet_jax.cpu import onednn_conv, onednn_ext

pytestmark = pytest.mark.cpu_kernels

DIMS = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(autouse=True)
def convolutions():
  """Skips where XLA's oneDNN convolution cannot run here."""
  reason = onednn_conv.problem()
  if reason:
    pytest.skip(f'oneDNN convolutions cannot run here: {reason}')


@pytest.fixture
def kernel_gradients():
  """Skips where resnet_jax's kernel-gradient extension cannot be built or loaded here."""
  reason = onednn_conv.kernel_gradient_problem()
  if reason:
    pytest.skip(f'oneDNN kernel gradients cannot run here: {reason}')


def _value_and_grads(conv, strides, padding, **kwargs):
  def fn(x, w):
    y = conv(x, w, strides, padding, dimension_numbers=DIMS, **kwargs)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
  return jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))


def _custom_calls(compiled_text):
  return re.findall(r'(\w+\[[\d,]*\])\S* custom-call\([^\n]*__onednn\$convolution', compiled_text)


def _kernel_grad_calls(compiled_text):
  """The operand shapes of each oneDNN kernel-gradient call (resnet_jax's extension)."""
  return re.findall(f'custom_call_target="{onednn_conv.KERNEL_GRAD_TARGET}", '
                    r'operand_layout_constraints=\{(\w+\[[\d,]*\])\{[\d,]*\}, (\w+\[[\d,]*\])',
                    compiled_text)


def _assert_close(a, ref):
  assert a.shape == ref.shape and a.dtype == ref.dtype
  a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
  np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize('x_shape,kernel_shape,strides,padding,calls', [
    ((4, 8, 8, 16), (3, 3, 16, 16), (1, 1), 'SAME', 2),             # forward, input gradient
    ((4, 8, 8, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1)), 1),   # strided: forward only
    ((4, 9, 9, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), 2),     # CIFAR stem, odd size
    ((2, 8, 8, 8), (1, 1, 8, 16), (2, 2), 'VALID', 1),              # projection shortcut
    ((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((0, 2), (2, 0)), 2),      # lopsided padding
    ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), 1),    # ImageNet stem
    ((2, 9, 7, 4), (3, 3, 4, 6), (2, 2), 'SAME', 1),                # odd sizes, strided
    ((2, 9, 8, 4), (3, 2, 4, 6), (3, 2), ((2, 0), (1, 1)), 1),      # unequal strides, kernel
    ((2, 6, 6, 4), (3, 3, 4, 6), (1, 1), ((3, 3), (0, 0)), 1),      # padding > kernel - 1
])
@pytest.mark.parametrize('kernel_grads', [False, True])
def test_same_convolution_as_lax(x_shape, kernel_shape, strides, padding, calls, kernel_grads,
                                 request):
  if kernel_grads:
    request.getfixturevalue('kernel_gradients')
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), kernel_shape)
  (_, y_ref), grads_ref = _value_and_grads(jax.lax.conv_general_dilated, strides, padding)(x, w)
  step = _value_and_grads(onednn_conv.conv_general_dilated, strides, padding,
                          kernel_grads=kernel_grads)
  (_, y), grads = step(x, w)
  # Float32 rounding only: the sums run in another order.
  for a, ref in ((y, y_ref), *zip(grads, grads_ref)):
    _assert_close(a, ref)
  # oneDNN runs the forward conv and, at stride 1, the input gradient; the
  # kernel gradient on request (resnet_jax's extension); XLA the rest.
  text = step.lower(x, w).compile().as_text()
  assert len(_custom_calls(text)) == calls
  assert _kernel_grad_calls(text) == ([(f'f32[{",".join(map(str, x_shape))}]',
                                        f'f32[{",".join(map(str, y.shape))}]')]
                                      if kernel_grads else [])
  # Forward mode too.
  def conv(conv_fn, x, w):
    return conv_fn(x, w, strides, padding, dimension_numbers=DIMS)
  tangents = (jnp.cos(x), jnp.sin(w))
  _, t = jax.jvp(lambda x, w: conv(onednn_conv.conv_general_dilated, x, w), (x, w), tangents)
  _, t_ref = jax.jvp(lambda x, w: conv(jax.lax.conv_general_dilated, x, w), (x, w), tangents)
  _assert_close(t, t_ref)


@pytest.mark.parametrize('kwargs', [
    {'dtype': jnp.bfloat16},
    {'dimension_numbers': ('NCHW', 'OIHW', 'NCHW')},
    {'feature_group_count': 2},
    {'rhs_dilation': (2, 2)},
    {'lhs_dilation': (2, 2)},
])
def test_other_convolutions_pass_through_to_lax(kwargs):
  kwargs = dict(kwargs)
  dtype = kwargs.pop('dtype', jnp.float32)
  dims = kwargs.pop('dimension_numbers', DIMS)
  groups = kwargs.get('feature_group_count', 1)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8), dtype)
  w = jax.random.normal(jax.random.key(1), (3, 3, 8 // groups, 8), dtype)
  if dims != DIMS:
    w = w.transpose(3, 2, 0, 1)  # OIHW
  args = (x, w, (1, 1), ((1, 1), (1, 1)))
  jaxpr = str(jax.make_jaxpr(lambda x, w: onednn_conv.conv_general_dilated(
      x, w, *args[2:], dimension_numbers=dims, **kwargs))(x, w))
  assert 'onednn' not in jaxpr and 'conv_general_dilated' in jaxpr
  y = onednn_conv.conv_general_dilated(*args, dimension_numbers=dims, **kwargs)
  np.testing.assert_array_equal(
      y, jax.lax.conv_general_dilated(*args, dimension_numbers=dims, **kwargs))


def test_a_batch_sharded_jit_convolves_each_shard_on_its_own_device(kernel_gradients):
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ('data',))
  n = len(devices)
  x = jax.random.normal(jax.random.key(0), (2 * n, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  step = _value_and_grads(onednn_conv.conv_general_dilated, (1, 1), 'SAME')
  x_sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  w_replicated = jax.device_put(w, NamedSharding(mesh, P()))
  text = step.lower(x_sharded, w_replicated).compile().as_text()
  # Each device's calls see its own 2 images; nothing gathers the batch; the
  # kernel gradient sums its shard, then one all-reduce adds the shards up.
  assert _custom_calls(text) == ['f32[2,8,8,16]'] * 2, _custom_calls(text)
  assert _kernel_grad_calls(text) == [('f32[2,8,8,16]', 'f32[2,8,8,16]')], text
  assert 'all-gather' not in text
  assert len(re.findall(r'f32\[3,3,16,16\]\S* all-reduce\(', text)) == 1, text
  (_, y), grads = step(x_sharded, w_replicated)
  (_, y_ref), grads_ref = _value_and_grads(jax.lax.conv_general_dilated, (1, 1), 'SAME')(x, w)
  assert y.sharding.spec[0] == 'data'
  for a, ref in ((y, y_ref), *zip(grads, grads_ref)):
    _assert_close(a, ref)


def test_explicit_mesh_axes_give_lax_gradients_and_shardings():
  mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:2])
  x = jax.device_put(jax.random.normal(jax.random.key(0), (4, 8, 8, 16)),
                     NamedSharding(mesh, P('data')))
  w = jax.device_put(jax.random.normal(jax.random.key(1), (3, 3, 16, 16)),
                     NamedSharding(mesh, P()))
  with jax.sharding.set_mesh(mesh):
    (_, y), grads = _value_and_grads(onednn_conv.conv_general_dilated, (1, 1), 'SAME')(x, w)
    (_, y_ref), grads_ref = _value_and_grads(jax.lax.conv_general_dilated, (1, 1), 'SAME')(x, w)
  for a, ref in ((y, y_ref), *zip(grads, grads_ref)):
    assert a.sharding.spec == ref.sharding.spec
    _assert_close(a, ref)


def test_pmap_runs_it_per_device(kernel_gradients):
  n = jax.local_device_count()
  x = jax.random.normal(jax.random.key(0), (n, 2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  fn = lambda conv: jax.pmap(lambda x: conv(x, w, (1, 1), 'SAME', dimension_numbers=DIMS))
  assert _custom_calls(fn(onednn_conv.conv_general_dilated).lower(x).compile().as_text())
  np.testing.assert_allclose(fn(onednn_conv.conv_general_dilated)(x),
                             fn(jax.lax.conv_general_dilated)(x), rtol=1e-5, atol=1e-4)
  # Each device's kernel gradient of its own images, summed over devices by the caller.
  grad = lambda conv: jax.pmap(jax.grad(lambda w, x: jnp.sum(jnp.sin(  # noqa: E731
      conv(x, w, (1, 1), 'SAME', dimension_numbers=DIMS)))), in_axes=(None, 0))
  text = grad(onednn_conv.conv_general_dilated).lower(w, x).compile().as_text()
  assert _kernel_grad_calls(text) == [('f32[2,8,8,16]', 'f32[2,8,8,16]')]
  _assert_close(grad(onednn_conv.conv_general_dilated)(w, x), grad(jax.lax.conv_general_dilated)(w, x))


def _conv(conv_fn, strides=(1, 1), padding='SAME'):
  return lambda x, w: conv_fn(x, w, strides, padding, dimension_numbers=DIMS)


def test_higher_order_derivatives_match_lax():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  results = []
  for conv_fn in (onednn_conv.conv_general_dilated, jax.lax.conv_general_dilated):
    loss = lambda x, w, conv=_conv(conv_fn): jnp.sum(jnp.sin(conv(x, w)))
    grad_x, grad_w = jax.grad(loss), jax.grad(loss, 1)
    results.append((jax.grad(lambda w: jnp.sum(grad_x(x, w) ** 2))(w),          # grad of grad
                    jax.jvp(lambda x: grad_x(x, w), (x,), (jnp.cos(x),))[1],   # jvp of grad
                    # The kernel gradient's own derivatives (in x and in the output's).
                    jax.grad(lambda x: jnp.sum(grad_w(x, w) ** 2))(x),
                    jax.jvp(lambda w: grad_w(x, w), (w,), (jnp.cos(w),))[1]))
  jax.tree.map(_assert_close, *results)


@pytest.mark.parametrize('in_axes', [(0, None), (1, None), (None, 0), (0, 0)])
def test_vmap_matches_lax(in_axes):
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 5))
  x = x if in_axes[0] is not None else x[0]
  x = jnp.moveaxis(x, 0, 1) if in_axes[0] == 1 else x
  w = w if in_axes[1] is not None else w[0]
  got = jax.vmap(_conv(onednn_conv.conv_general_dilated), in_axes)(x, w)
  _assert_close(got, jax.vmap(_conv(jax.lax.conv_general_dilated), in_axes)(x, w))
  jaxpr = str(jax.make_jaxpr(jax.vmap(_conv(onednn_conv.conv_general_dilated), in_axes))(x, w))
  # A batched input folds into the conv's batch and stays on oneDNN.
  assert ('onednn_conv2d' in jaxpr) == (in_axes[1] is None), jaxpr


def test_vmap_of_the_kernel_gradient_matches_lax():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  grads = [jax.vmap(jax.grad(lambda w, x, conv=_conv(conv_fn, (2, 2)): jnp.sum(jnp.sin(conv(
      x, w)))), (None, 0))(w, x)
           for conv_fn in (onednn_conv.conv_general_dilated, jax.lax.conv_general_dilated)]
  _assert_close(*grads)


def test_grad_inside_shard_map_matches_lax():
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  grads = []
  for conv_fn in (onednn_conv.conv_general_dilated, jax.lax.conv_general_dilated):
    def loss(x, w, conv=_conv(conv_fn)):
      return jax.lax.psum(jnp.sum(jnp.sin(conv(x, w))), 'data')
    sharded = jax.shard_map(jax.grad(loss, (0, 1)), mesh=mesh, in_specs=(P('data'), P()),
                            out_specs=(P('data'), P()))
    grads.append(jax.jit(sharded)(x, w))
  jax.tree.map(_assert_close, *grads)


def test_bad_and_empty_shapes_behave_as_in_lax():
  conv = _conv(onednn_conv.conv_general_dilated, (2, 2), 'VALID')
  with pytest.raises(ValueError, match='feature dimension'):  # lax's error, not a crash
    conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 4, 5)))
  x, w = jnp.ones((1, 1, 1, 3)), jnp.ones((3, 3, 3, 5))
  assert conv(x, w).shape == _conv(jax.lax.conv_general_dilated, (2, 2), 'VALID')(x, w).shape


def test_resnet20_on_the_plugin_is_the_same_network(kernel_gradients):
  """And a canary: it fails if jaxlib stops running the custom call."""
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  labels = jnp.arange(4) % 10
  results, calls = [], []
  for options in ({}, cpu.check().model_options()):
    model = models.create_model('resnet20', 10, **options)
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(params, model=model, variables=variables):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    text = step.lower(variables['params']).compile().as_text()
    calls.append((len(_custom_calls(text)), len(_kernel_grad_calls(text))))
    results.append(step(variables['params']))
  # 19 forward convs, and the input gradients of the 16 stride-1 block convs;
  # the kernel gradients of all 19.
  assert calls == [(0, 0), (19 + 16, 19)]
  ((_, logits_a), grads_a), ((_, logits_b), grads_b) = results
  _assert_close(logits_b, logits_a)
  jax.tree.map(_assert_close, grads_b, grads_a)


@pytest.mark.parametrize('configured,env,backend_name,expected', [
    ('auto', '', 'cpu', True), ('on', '', 'cpu', True), ('off', '', 'cpu', False),
    ('auto', 'off', 'cpu', False), ('auto', 'on', 'cpu', True), ('on', 'off', 'cpu', True),
    ('auto', '', 'gpu', False), ('auto', '', 'tpu', False), ('off', '', 'gpu', False),
])
def test_the_trainer_chooses_the_plugin_once_from_config_and_backend(
    monkeypatch, configured, env, backend_name, expected):
  monkeypatch.setenv(backend.CPU_KERNELS_ENV, env)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend_name)
  choice = backend.choose_cpu_kernels(configured)
  assert ('conv_general_dilated' in choice.model_options) == expected
  if not expected:
    assert choice.model_options == {} and choice.description.startswith('off')


def test_cpu_kernels_on_off_the_cpu_and_bad_values_fail_clearly(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(errors.ConfigError, match='cpu_kernels=on needs the CPU backend'):
    backend.choose_cpu_kernels('on')
  with pytest.raises(errors.ConfigError, match="config.cpu_kernels='yes'; choose one of auto"):
    backend.choose_cpu_kernels('yes')
  monkeypatch.setenv(backend.CPU_KERNELS_ENV, 'fast')
  with pytest.raises(errors.ConfigError, match=r"\$RESNET_JAX_CPU_KERNELS='fast'"):
    backend.choose_cpu_kernels('auto')


def _plugin_falls_back(expected_reason):
  """auto: XLA's convolutions and a description that says why; on: a clear error."""
  choice = backend.choose_cpu_kernels('auto')
  assert choice.model_options == {}
  assert expected_reason in choice.description, choice.description
  with pytest.raises(errors.ConfigError, match='cpu_kernels=on, but the CPU plugin cannot run'):
    backend.choose_cpu_kernels('on')


def test_a_jaxlib_that_reads_the_call_differently_is_caught_before_training(monkeypatch):
  original = onednn_conv.backend_config

  def misread(kernel_shape, strides, padding):  # padding on the other side
    config = json.loads(original(kernel_shape, strides, padding))
    window = config['onednnConvConfig']['window']
    window['padLeft'], window['padRight'] = window['padRight'], window['padLeft']
    return json.dumps(config)
  monkeypatch.setattr(onednn_conv, 'backend_config', misread)
  monkeypatch.setenv(backend.CPU_KERNELS_ENV, '')
  onednn_conv.problem.cache_clear()
  try:
    assert onednn_conv.problem() and not onednn_conv.available()
    _plugin_falls_back('computed a different convolution than lax')
  finally:
    monkeypatch.undo()
    onednn_conv.problem.cache_clear()
  # First asked while a model is traced (as in a jitted init), it still runs the check.
  assert bool(jax.jit(lambda: jnp.asarray(onednn_conv.available()))())


def test_a_jaxlib_not_validated_is_not_tried_and_the_run_goes_on(monkeypatch):
  """XLA would abort the process on a config it cannot read: such a jaxlib is never asked."""
  monkeypatch.setattr(onednn_conv, 'VALIDATED_JAXLIB', '0.99.')
  monkeypatch.setattr(onednn_conv, '_check', lambda: pytest.fail('the call was tried'))
  monkeypatch.setenv(backend.CPU_KERNELS_ENV, '')
  onednn_conv.problem.cache_clear()
  try:
    _plugin_falls_back('validated for jaxlib 0.99.x only')
  finally:
    monkeypatch.undo()
    onednn_conv.problem.cache_clear()


def test_the_extension_is_compiled_once_then_cached(tmp_path, monkeypatch, kernel_gradients):
  monkeypatch.setenv('RESNET_JAX_CACHE', str(tmp_path))
  path = onednn_ext.build()
  assert path.parent == tmp_path and path.name.startswith('onednn_kernel_grad-')
  mtime = path.stat().st_mtime_ns
  assert onednn_ext.build() == path and path.stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left


def test_the_extension_says_what_is_missing(tmp_path, monkeypatch, kernel_gradients):
  monkeypatch.setenv('RESNET_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(onednn_ext.ExtensionError, match=r'no C\+\+ compiler.*set CXX'):
    onednn_ext.build()
  monkeypatch.delenv('CXX')
  monkeypatch.setattr(onednn_ext, 'ONEDNN', 'no-such-package')
  with pytest.raises(onednn_ext.ExtensionError, match='no-such-package is not installed'):
    onednn_ext.build()
  monkeypatch.undo()
  monkeypatch.setenv('RESNET_JAX_CACHE', str(tmp_path))
  broken = tmp_path / 'broken.cc'
  broken.write_text('#error this source does not compile\n')
  monkeypatch.setattr(onednn_ext, 'SOURCE', broken)
  with pytest.raises(onednn_ext.ExtensionError, match='(?s)failed.*this source does not compile'):
    onednn_ext.build()
  assert [p.name for p in tmp_path.iterdir()] == ['broken.cc']


def test_without_the_extension_xla_computes_kernel_gradients(monkeypatch):
  """auto then keeps oneDNN's convolutions and says why the kernel gradients are XLA's."""
  def unavailable():
    raise onednn_ext.ExtensionError('the pip package onednn-cpu-gomp is not installed')
  monkeypatch.setattr(onednn_conv, '_register_kernel_gradient', unavailable)
  monkeypatch.setenv(backend.CPU_KERNELS_ENV, '')
  onednn_conv.kernel_gradient_problem.cache_clear()
  try:
    assert 'onednn-cpu-gomp' in onednn_conv.kernel_gradient_problem()
    choice = backend.choose_cpu_kernels('on')
    assert "XLA's kernel gradients (the pip package onednn-cpu-gomp" in choice.description
    x = jnp.zeros((2, 8, 8, 3))
    model = models.create_model('resnet20', 10, **choice.model_options)
    variables = model.init(jax.random.key(0), x, train=False)
    loss = lambda p: jnp.sum(model.apply({**variables, 'params': p}, x, train=False))  # noqa
    text = jax.jit(jax.grad(loss)).lower(variables['params']).compile().as_text()
    assert _custom_calls(text) and not _kernel_grad_calls(text)
  finally:
    monkeypatch.undo()
    onednn_conv.kernel_gradient_problem.cache_clear()


def test_every_host_runs_process_zeros_choice_or_the_run_stops(tmp_path, digits_dir,
                                                               kernel_gradients):
  """2 processes on 127.0.0.1: the same plugin program on both, or a clear stop on both."""
  from tests import test_multihost  # pylint: disable=import-outside-toplevel
  args = [f'--config.data.data_dir={digits_dir}', '--config.cpu_kernels=on',
          *test_multihost.ARGS[1:], '--config.num_train_steps=2']
  logs = test_multihost._finish(test_multihost._start_hosts(tmp_path / 'alike', *args))
  for log in logs:
    assert 'CPU kernels: oneDNN convolutions, input and kernel gradients' in log
  with open(tmp_path / 'alike' / 'config.json') as f:
    assert json.load(f)['cpu_kernels_used'].startswith('oneDNN convolutions, input and kernel')
  # Host 1 cannot build the extension (no compiler, an empty cache): it cannot follow.
  unlike = ({}, {'CXX': 'no-such-compiler', 'RESNET_JAX_CACHE': str(tmp_path / 'empty')})
  hosts = test_multihost._start_hosts(tmp_path / 'unlike', *args, host_env=unlike)
  logs = test_multihost._finish(hosts, check=False)
  assert [process.returncode for process, _ in hosts] == [1, 1]
  for log in logs:
    assert ('Process 0 chose oneDNN convolutions and kernel gradients (config.cpu_kernels), but '
            'process(es) [1] cannot run them') in log, log[-3000:]
    assert 'Traceback' not in log
  assert 'no C++ compiler' in logs[1]
  assert not (tmp_path / 'unlike' / 'checkpoints').exists()
