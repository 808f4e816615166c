"""2-D convolutions on oneDNN's kernels under XLA:CPU, in place of `lax.conv_general_dilated`.

Why: jaxlib's XLA:CPU links oneDNN and runs the custom call
`__onednn$convolution` (a forward convolution) on it, but its own passes no
longer rewrite convolutions to it; they go to YNNPACK or Eigen instead, which
are slower for the narrow channels-last convs of ResNets (docs/performance.md
has the figures). PyTorch's CPU convolutions are oneDNN's too.

`conv_p` is a primitive that is bilinear like `lax.conv`, so `grad`, `jvp`,
higher orders, `vmap` and `shard_map` work. Forward and tangents run on
oneDNN; the input gradient of a stride-1 conv too (the flipped kernel). The
kernel gradient (`kernel_grads=True`, the default where it works) runs
oneDNN's backward-weights primitive through resnet_jax's own C++ extension
(`kernel_grad_p`; csrc/onednn_kernel_grad.cc, built on first use by
`onednn_ext`): XLA:CPU's custom call is a forward convolution only, and the
kernel gradient posed as one picked oneDNN's reference implementation. A
strided conv's input gradient uses XLA's own convolution (one stride-1 oneDNN
conv per output phase, interleaved, was tried: the interleave slows the fusion
that consumes it), as does every kernel gradient when the extension is
unavailable (`kernel_gradient_problem`).
Under `jit` over a mesh both calls are partitioned over the batch dimension
(`custom_partitioning`): each device convolves its own shard, and each sums
the kernel gradient over its own shard before one all-reduce adds the shards.
Off the CPU they lower to `lax.conv_general_dilated`. Results equal lax's up
to float32 summation order (tested).

Only channels-last (NHWC input, HWIO kernel) float32 2-D convs without
dilation or groups, with a non-empty result, take this path;
`conv_general_dilated` passes anything else to lax unchanged. Not supported:
`jax.export` (the calls are XLA-internal or this process's own). `problem()`
says whether this process can use the convolutions (x86-64 CPUs, the jaxlib
versions in VALIDATED_JAXLIB), `kernel_gradient_problem()` the kernel gradients.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P
from jax._src import dispatch  # pylint: disable=g-bad-import-order

from resnet_jax.cpu import onednn_ext

_LOG = logging.getLogger(__name__)
TARGET = '__onednn$convolution'
# The jaxlib versions whose XLA reads `backend_config` as written here.
VALIDATED_JAXLIB = '0.10.'
# (batch or input feature, feature or output feature, spatial...) positions.
NHWC = (0, 3, 1, 2)
HWIO = (2, 3, 0, 1)
_DIMENSION_NUMBERS = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, ('NHWC', 'HWIO', 'NHWC'))

Pads = tuple[tuple[int, int], tuple[int, int]]


def _reference(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


def _lax_abstract_eval(lhs, rhs, *, window_strides, padding, dimension_numbers,
                       rhs_dilation=(1, 1), out_sharding=None):
  """lax's own rule for an undilated, ungrouped conv: its shape checks and errors, and the
  output's sharding and vma type."""
  out, _ = lax.conv_general_dilated_p.abstract_eval(
      lhs, rhs, window_strides=window_strides, padding=padding, lhs_dilation=(1, 1),
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=1,
      batch_group_count=1, precision=None, preferred_element_type=None,
      out_sharding=out_sharding)
  return out


def _abstract_eval(x, w, *, strides, padding, kernel_grads=False):
  del kernel_grads
  return _lax_abstract_eval(x, w, window_strides=strides, padding=padding,
                            dimension_numbers=_DIMENSION_NUMBERS)


# The custom call itself: one device's (or shard's) convolution.
_call_p = Primitive('onednn_conv2d_call')
_call_p.def_abstract_eval(_abstract_eval)


def backend_config(kernel_shape: Sequence[int], strides: tuple[int, int], padding: Pads) -> str:
  """XLA:CPU's `OneDnnConvolutionConfig` (in its BackendConfig, as JSON) for NHWC/HWIO.

  As the jaxlib this was written for reads it: dimension indices count from 0,
  window values are plain (a dilation of 1 means none).
  """
  data = {'batchDim': NHWC[0], 'featureDim': NHWC[1], 'spatialDims': list(NHWC[2:])}
  config = {
      'dims': 4,
      'input': {'dims': 4, 'data': data},
      'kernel': {'dims': 4, 'filter': {
          'inputFeatureDim': HWIO[0], 'outputFeatureDim': HWIO[1],
          'spatialDims': list(HWIO[2:]), 'shape': list(kernel_shape)}},
      'output': {'dims': 4, 'data': data},
      'window': {'size': list(kernel_shape[:2]), 'padLeft': [lo for lo, _ in padding],
                 'padRight': [hi for _, hi in padding], 'strides': list(strides),
                 'windowDilations': [1, 1]},
      'featureGroups': 1,
  }
  return json.dumps({'onednnConvConfig': config})


def _call_lowering(ctx, x, w, *, strides, padding):
  # A legacy (api_version 1) custom call with a string config; default layouts
  # are row-major, as the config's dimension indices assume.
  return jax.ffi.ffi_lowering(
      TARGET, api_version=1,
      backend_config=backend_config(ctx.avals_in[1].shape, strides, padding))(ctx, x, w)


mlir.register_lowering(_call_p, _call_lowering, platform='cpu')


def _batch_axes(sharding: Any) -> Any:
  """The mesh axes that shard an NHWC operand's batch dimension (None: not sharded)."""
  if isinstance(sharding, NamedSharding) and len(sharding.spec):
    return sharding.spec[0]
  return None


def _infer_sharding(strides, padding, mesh, arg_shapes, result_shape):
  """The result is sharded over the batch as the input is; nothing else stays sharded."""
  del strides, padding, result_shape
  return NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding)))


def _partition(strides, padding, mesh, arg_shapes, result_shape):
  batch = _infer_sharding(strides, padding, mesh, arg_shapes, result_shape)

  def per_shard(x, w):
    return _call_p.bind(x, w, strides=strides, padding=padding)

  return mesh, per_shard, batch, (batch, NamedSharding(mesh, P()))


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _partitioned_call(x, w, strides, padding):
  return _call_p.bind(x, w, strides=strides, padding=padding)


_partitioned_call.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer_sharding,
    propagate_user_sharding=lambda strides, padding, mesh, user_shape: user_shape.sharding,
    # Only the batch (n) may stay sharded; every other factor is gathered.
    sharding_rule='n h w c, k l c o -> n i j o',
    need_replication_factors=('h', 'w', 'c', 'k', 'l', 'o', 'i', 'j'))


# The differentiable convolution.
conv_p = Primitive('onednn_conv2d')
conv_p.def_abstract_eval(_abstract_eval)
conv_p.def_impl(functools.partial(dispatch.apply_primitive, conv_p))


def _varying(aval: Any) -> frozenset:
  """The manual mesh axes (shard_map) over which values of this type vary."""
  axis_type = getattr(aval, 'manual_axis_type', None)
  return axis_type.varying if axis_type is not None else getattr(aval, 'vma', frozenset())


def _varying_axes(x: jax.Array) -> frozenset:
  return _varying(jax.typeof(x))


def _same_varying(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Both operands made to vary over the same manual axes (as lax's binds do in shard_map)."""
  vma_a, vma_b = _varying_axes(a), _varying_axes(b)
  if vma_b - vma_a:
    a = lax.pcast(a, tuple(vma_b - vma_a), to='varying')
  if vma_a - vma_b:
    b = lax.pcast(b, tuple(vma_a - vma_b), to='varying')
  return a, b


def _bind(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads,
          kernel_grads: bool) -> jax.Array:
  x, w = _same_varying(x, w)
  return conv_p.bind(x, w, strides=strides, padding=padding, kernel_grads=kernel_grads)


def _cpu_lowering(ctx, x, w, *, strides, padding, kernel_grads):
  del kernel_grads
  call = lambda x, w: _partitioned_call(x, w, strides, padding)  # noqa: E731
  return mlir.lower_fun(call, multiple_results=False)(ctx, x, w)


# custom_partitioning needs the device assignment while lowering: not cacheable
# (a cached lowering has none), and jit must pass it (as for jax's own cuDNN
# attention primitives, which lower to custom_partitioning the same way).
# (So `jax.export` cannot lower it for several platforms at once; a CPU export
# would in any case hold an XLA-internal call with no compatibility guarantee.)
mlir.register_lowering(conv_p, _cpu_lowering, platform='cpu', cacheable=False)
_NEEDS_DEVICES = getattr(dispatch, 'prim_requires_devices_during_lowering', None)
if _NEEDS_DEVICES is not None:
  _NEEDS_DEVICES.add(conv_p)
mlir.register_lowering(conv_p, mlir.lower_fun(
    lambda x, w, *, strides, padding, kernel_grads: _reference(x, w, strides, padding),
    multiple_results=False))


def _input_gradient(ct, x, w, *, strides, padding, kernel_grads):
  """Transpose in the input: a stride-1 conv's is a conv with the kernel flipped (oneDNN)."""
  kernel = w.shape[:2]
  if strides == (1, 1) and all(0 <= p <= k - 1 for pads, k in zip(padding, kernel) for p in pads):
    flipped = jnp.flip(w, (0, 1)).swapaxes(2, 3)
    pads = tuple((k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(padding, kernel))
    return _bind(ct, flipped, (1, 1), pads, kernel_grads)
  return jax.vjp(lambda x: _reference(x, w, strides, padding), _zeros_like(x.aval))[1](ct)[0]


def _kernel_gradient(ct, x, w, *, strides, padding, kernel_grads):
  """Transpose in the kernel: oneDNN's backward-weights (`kernel_grads`) or XLA's own."""
  if kernel_grads:
    x, ct = _same_varying(x, ct)
    return kernel_grad_p.bind(x, ct, kernel_shape=tuple(w.aval.shape), strides=strides,
                              padding=padding, kernel_sharding=w.aval.sharding)
  return jax.vjp(lambda w: _reference(x, w, strides, padding), _zeros_like(w.aval))[1](ct)[0]


def _zeros_like(aval: Any) -> jax.Array:
  """A stand-in primal of this type for `vjp` (XLA drops the unused forward conv).

  It varies over the manual axes (shard_map) the primal varies over, so the
  transpose adds no reduction of its own; `_bind`'s cast supplies that.
  """
  zeros = jnp.zeros(aval.shape, aval.dtype)
  axes = tuple(_varying(aval))
  return lax.pcast(zeros, axes, to='varying') if axes else zeros


ad.defbilinear(conv_p, _input_gradient, _kernel_gradient)


def _batch(args, dims, *, strides, padding, kernel_grads):
  """vmap: a batched input folds into the conv's own batch; anything else runs lax's conv."""
  (x, w), (x_dim, w_dim) = args, dims
  if w_dim is None:  # not mapped
    x = jnp.moveaxis(x, x_dim, 0)
    y = _bind(x.reshape(-1, *x.shape[2:]), w, strides, padding, kernel_grads)
    return y.reshape(x.shape[0], x.shape[1], *y.shape[1:]), 0
  conv = functools.partial(_reference, strides=strides, padding=padding)
  return jax.vmap(conv, in_axes=(x_dim, w_dim))(x, w), 0


batching.primitive_batchers[conv_p] = _batch


# The kernel gradient on oneDNN's backward-weights primitive, from resnet_jax's
# C++ extension (csrc/onednn_kernel_grad.cc, built by onednn_ext). XLA computes
# it as a convolution with batch and features swapped (lax's transpose rule),
# which needs both operands transposed; oneDNN reads them as they are.
KERNEL_GRAD_TARGET = 'resnet_jax_onednn_kernel_gradient'
# lax's transpose rule for the kernel: batch and feature roles swapped.
_KERNEL_GRAD_DIMENSION_NUMBERS = lax.ConvDimensionNumbers(
    lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(2, 3, 0, 1))


def _kernel_gradient_padding(x_shape, ct_shape, kernel_shape, strides, padding) -> Pads:
  """The padding of the kernel gradient as a convolution of x with ct (as lax's rule)."""
  pads = []
  for size, out, k, s, (lo, _) in zip(x_shape[1:3], ct_shape[1:3], kernel_shape[:2], strides,
                                      padding):
    pads.append((lo, (out - 1) * s + 1 - size + k - lo - 1))
  return tuple(pads)


def _kernel_gradient_reference(x, ct, *, kernel_shape, strides, padding, kernel_sharding=None):
  pads = _kernel_gradient_padding(x.shape, ct.shape, kernel_shape, strides, padding)
  return lax.conv_general_dilated(x, ct, (1, 1), pads, rhs_dilation=strides,
                                  dimension_numbers=_KERNEL_GRAD_DIMENSION_NUMBERS,
                                  out_sharding=kernel_sharding)


def _kernel_gradient_abstract_eval(x, ct, *, kernel_shape, strides, padding,
                                   kernel_sharding=None):
  """lax's rule for its own kernel-gradient conv (as lax's transpose binds it)."""
  out = _lax_abstract_eval(
      x, ct, window_strides=(1, 1),
      padding=_kernel_gradient_padding(x.shape, ct.shape, kernel_shape, strides, padding),
      rhs_dilation=strides, dimension_numbers=_KERNEL_GRAD_DIMENSION_NUMBERS,
      out_sharding=kernel_sharding)
  assert out.shape == tuple(kernel_shape), (out.shape, kernel_shape)
  return out


# The FFI call: one device's (or shard's) part of the sum over the batch.
_kernel_call_p = Primitive('onednn_kernel_gradient_call')
_kernel_call_p.def_abstract_eval(_kernel_gradient_abstract_eval)


def threads_per_device() -> int:
  """oneDNN threads per call: this process's cores shared among its XLA CPU devices.

  One where OMP_THREAD_LIMIT is set: oneDNN splits the work for the thread
  count it planned with, and the limit counts the threads of all devices'
  concurrent calls together, so a call could get fewer.
  """
  if os.environ.get('OMP_THREAD_LIMIT'):
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, (cores or 1) // len(jax.local_devices(backend='cpu')))


def _kernel_call_lowering(ctx, x, ct, *, kernel_shape, strides, padding, kernel_sharding):
  del kernel_shape, kernel_sharding  # the result's type
  _register_kernel_gradient()  # builds the extension if needed, or says what is missing
  (top, bottom), (left, right) = padding
  return jax.ffi.ffi_lowering(KERNEL_GRAD_TARGET)(
      ctx, x, ct, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
      pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
      pad_right=np.int64(right), threads=np.int64(threads_per_device()))


mlir.register_lowering(_kernel_call_p, _kernel_call_lowering, platform='cpu')


def _kernel_partition(kernel_shape, strides, padding, kernel_sharding, mesh, arg_shapes,
                      result_shape):
  """Each device sums over its batch shard; a psum over the batch's mesh axes adds them up."""
  del kernel_sharding, result_shape
  axes = _batch_axes(arg_shapes[0].sharding)
  if axes is None:  # x replicated: shard both as ct is rather than gather ct
    axes = _batch_axes(arg_shapes[1].sharding)
  batch = NamedSharding(mesh, P(axes))

  def per_shard(x, ct):
    dw = _kernel_call_p.bind(x, ct, kernel_shape=kernel_shape, strides=strides,
                             padding=padding, kernel_sharding=None)
    return lax.psum(dw, axes) if axes is not None else dw

  return mesh, per_shard, NamedSharding(mesh, P()), (batch, batch)


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4, 5))
def _partitioned_kernel_call(x, ct, kernel_shape, strides, padding, kernel_sharding):
  return _kernel_call_p.bind(x, ct, kernel_shape=kernel_shape, strides=strides, padding=padding,
                             kernel_sharding=kernel_sharding)


_partitioned_kernel_call.def_partition(
    partition=_kernel_partition,
    infer_sharding_from_operands=lambda *args: NamedSharding(args[4], P()),
    propagate_user_sharding=lambda *args: args[-1].sharding,
    # The batch (n) may stay sharded (the partition sums over it); nothing else.
    sharding_rule='n h w c, n i j o -> k l c o',
    need_replication_factors=('h', 'w', 'c', 'i', 'j', 'o', 'k', 'l'))

# The differentiable kernel gradient (bilinear in x and ct: second order works).
kernel_grad_p = Primitive('onednn_kernel_gradient')
kernel_grad_p.def_abstract_eval(_kernel_gradient_abstract_eval)
kernel_grad_p.def_impl(functools.partial(dispatch.apply_primitive, kernel_grad_p))


def _kernel_grad_cpu_lowering(ctx, x, ct, *, kernel_shape, strides, padding, kernel_sharding):
  # The partition's result is replicated; XLA reshards it to kernel_sharding if need be.
  call = lambda x, ct: _partitioned_kernel_call(  # noqa: E731
      x, ct, kernel_shape, strides, padding, kernel_sharding)
  return mlir.lower_fun(call, multiple_results=False)(ctx, x, ct)


mlir.register_lowering(kernel_grad_p, _kernel_grad_cpu_lowering, platform='cpu',
                       cacheable=False)
if _NEEDS_DEVICES is not None:
  _NEEDS_DEVICES.add(kernel_grad_p)
mlir.register_lowering(kernel_grad_p, mlir.lower_fun(_kernel_gradient_reference,
                                                     multiple_results=False))


def _kernel_grad_x_transpose(dw_ct, x, ct, *, kernel_shape, strides, padding, kernel_sharding):
  """d<dw_ct, dW(x, ct)>/dx: the input gradient of conv(x, dw_ct) at output cotangent ct."""
  del kernel_shape, kernel_sharding
  return _input_gradient(ct, x, dw_ct, strides=strides, padding=padding, kernel_grads=True)


def _kernel_grad_ct_transpose(dw_ct, x, ct, *, kernel_shape, strides, padding, kernel_sharding):
  """d<dw_ct, dW(x, ct)>/dct: the forward conv of x with dw_ct."""
  del ct, kernel_shape, kernel_sharding
  return _bind(x, dw_ct, strides, padding, True)


ad.defbilinear(kernel_grad_p, _kernel_grad_x_transpose, _kernel_grad_ct_transpose)


def _kernel_grad_batch(args, dims, *, kernel_sharding, **params):
  del kernel_sharding  # of the unbatched kernel
  return jax.vmap(functools.partial(_kernel_gradient_reference, **params), in_axes=dims)(
      *args), 0


batching.primitive_batchers[kernel_grad_p] = _kernel_grad_batch


@functools.cache
def problem() -> str | None:
  """Why this process cannot use the oneDNN path on its CPU, or None if it can.

  Runs one small strided, lopsidedly padded conv through the custom call and
  compares it with lax's: a jaxlib without the call, or one that computes
  another convolution from its config, is caught here rather than in a
  training step. A config that XLA's own checks reject would abort the
  process, so only the jaxlib versions whose format was validated try it.
  """
  if platform.machine().lower() not in ('x86_64', 'amd64'):
    reason = f'tested on x86-64 CPUs only, this is {platform.machine()}'
  elif not jaxlib.__version__.startswith(VALIDATED_JAXLIB):
    # XLA aborts the process on a config it cannot read: do not try another format.
    reason = (f"XLA's internal oneDNN call is validated for jaxlib {VALIDATED_JAXLIB}x only, "
              f'this is {jaxlib.__version__}')
  elif _NEEDS_DEVICES is None:
    reason = 'this jax has no jax._src.dispatch.prim_requires_devices_during_lowering'
  else:
    # Run now even when first asked while a model is being traced.
    with jax.ensure_compile_time_eval():
      reason = _check()
  if reason:
    _LOG.warning('oneDNN convolutions are not available, XLA runs them instead: %s', reason)
  return reason


def _disagrees_with_lax(call, reference, lhs_shape, rhs_shape, mismatch: str,
                        limit: int) -> str | None:
  """Runs `call` (jitted) and lax's `reference` on ramps of these shapes on this process's
  own CPU device: `mismatch` if they differ, the error (at most `limit` characters) if
  `call` fails, else None."""
  try:
    device = jax.local_devices(backend='cpu')[0]
    lhs = jax.device_put(
        np.linspace(-1, 1, np.prod(lhs_shape), dtype=np.float32).reshape(lhs_shape), device)
    rhs = jax.device_put(
        np.linspace(1, -1, np.prod(rhs_shape), dtype=np.float32).reshape(rhs_shape), device)
    got, want = jax.jit(call)(lhs, rhs), reference(lhs, rhs)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
      return mismatch
  except Exception as e:  # pylint: disable=broad-except
    return _describe(e, limit)
  return None


def _describe(error: Exception, limit: int) -> str:
  if isinstance(error, onednn_ext.ExtensionError):  # its message says what is missing
    return str(error)[:limit]
  return f'{type(error).__name__}: {error}'.strip()[:limit]


def _check() -> str | None:
  strides, padding = (2, 1), ((1, 0), (2, 1))
  return _disagrees_with_lax(
      lambda x, w: _call_p.bind(x, w, strides=strides, padding=padding),
      lambda x, w: _reference(x, w, strides, padding), (2, 7, 6, 3), (3, 3, 3, 5),
      'the custom call computed a different convolution than lax', limit=500)


def available() -> bool:
  """Whether the oneDNN path works here (see `problem`)."""
  return problem() is None


@functools.cache
def _register_kernel_gradient() -> None:
  library = onednn_ext.load()
  jax.ffi.register_ffi_target(KERNEL_GRAD_TARGET,
                             jax.ffi.pycapsule(library.ResnetJaxOnednnKernelGradient),
                             platform='cpu')


@functools.cache
def kernel_gradient_problem() -> str | None:
  """Why this process cannot run kernel gradients on oneDNN, or None if it can.

  Needs the convolutions (`problem`) and resnet_jax's C++ extension (built on
  first use, see `onednn_ext`); then one strided, lopsidedly padded kernel
  gradient must match lax's.
  """
  reason = problem()
  if reason is None:
    with jax.ensure_compile_time_eval():
      reason = _check_kernel_gradient()
    if reason:
      _LOG.warning('oneDNN kernel gradients are not available, XLA computes them: %s', reason)
  return reason


def _check_kernel_gradient() -> str | None:
  try:
    _register_kernel_gradient()
  except Exception as e:  # pylint: disable=broad-except
    return _describe(e, 1000)
  params = {'kernel_shape': (3, 3, 3, 5), 'strides': (2, 1), 'padding': ((1, 0), (2, 0))}
  return _disagrees_with_lax(  # ct: the output shape of a (2, 1)-strided 3x3 conv of x
      lambda x, ct: _kernel_call_p.bind(x, ct, kernel_sharding=None, **params),
      functools.partial(_kernel_gradient_reference, **params), (2, 7, 6, 3), (2, 3, 6, 5),
      'the extension computed a different kernel gradient than lax', limit=1000)


def supported(lhs: jax.Array, rhs: jax.Array, padding: Any, lhs_dilation: Any = None,
              rhs_dilation: Any = None, dimension_numbers: Any = None,
              feature_group_count: int = 1, batch_group_count: int = 1,
              preferred_element_type: Any = None) -> bool:
  """Whether `conv_general_dilated` with these arguments takes the oneDNN path."""
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  negative = not isinstance(padding, str) and any(p < 0 for pads in padding for p in pads)
  return (dims == _DIMENSION_NUMBERS and not dilated and not negative
          and feature_group_count == 1 and batch_group_count == 1
          and lhs.dtype == rhs.dtype == jnp.float32
          and preferred_element_type in (None, jnp.float32, np.float32))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, *,
                         kernel_grads: bool | None = None) -> jax.Array:
  """`lax.conv_general_dilated`, on oneDNN where `supported` (see the module docstring).

  kernel_grads: the kernel gradient on oneDNN too (resnet_jax's C++ extension);
  None: where `kernel_gradient_problem` finds none.
  """
  def stock() -> jax.Array:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)

  if not supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count, preferred_element_type):
    return stock()
  strides = tuple(int(s) for s in window_strides)
  pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
          if isinstance(padding, str) else padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  empty = lhs.size == 0 or any(size + lo + hi < k for size, (lo, hi), k
                               in zip(lhs.shape[1:3], pads, rhs.shape[:2]))
  if len(strides) != 2 or empty:  # lax's errors, or an empty result
    return stock()
  if kernel_grads is None:
    kernel_grads = kernel_gradient_problem() is None
  return _bind(lhs, rhs, strides, pads, bool(kernel_grads))
