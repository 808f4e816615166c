"""The train state and the pure train and eval steps (jax, flax and optax only).

The same step functions serve both parallel strategies: under `jax.jit` over a
mesh they see the global batch (`axis_name=None`); under `jax.pmap` they see
one device's batch and reduce gradients and metrics over `axis_name`. Metrics
are returned as sums with a count, so that masked (padded) evaluation
batches and any number of devices or hosts aggregate exactly.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_jax.data import device_augment as augment_lib
from resnet_jax import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training and must be checkpointed."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  schedule: optim.ScheduleState


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       schedule: optim.ScheduleState, input_shape: tuple[int, ...],
                       rng: jax.Array) -> TrainState:
  """Initial state from `rng`, with the schedule's initial state (optim.init_schedule_state);
  traceable: jit it with out_shardings to place it."""
  variables = model.init(rng, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      schedule=jax.tree.map(jnp.asarray, schedule))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Whether each label is among the k best classes, strictly.

  The label's logit must be finite and strictly greater than all but at most
  k-1 of the other logits. Ties count against the label, and so does any
  other logit it is not greater than (NaN included): a collapsed network (all
  logits equal) or a diverged one (NaN, inf) scores 100% error, not 0%.
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  beaten = jnp.sum(logits < label_logit, axis=-1)  # NaN compares False
  not_beaten = logits.shape[-1] - 1 - beaten
  return jnp.isfinite(label_logit[:, 0]) & (not_beaten < k)


def _error_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Summed top-1 and top-5 errors over the weighted examples."""
  return {f'top{k}_error': jnp.sum(jnp.where(topk_correct(logits, labels, k), 0.0, weights))
          for k in (1, 5)}


def average_crops(logits: jax.Array) -> jax.Array:
  """(batch, crops, classes) logits -> log of the crops' mean softmax probabilities.

  Computed in log space (log-mean-exp of log-softmax), so a class's averaged
  probability never underflows to a floor that other classes share.
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jax.nn.logsumexp(log_probs, axis=1) - jnp.log(jnp.float32(logits.shape[1]))


def _reduce(metrics: dict[str, jax.Array], axis_name: str | None) -> dict[str, jax.Array]:
  return jax.lax.psum(metrics, axis_name) if axis_name else metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, lr_fn: Callable[[Any, Any], Any],
               augment: augment_lib.DeviceAugment | None = None,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a batch: (augmentation,) forward with batch statistics, backward, update."""
  images, labels = batch['image'], batch['label']
  if augment is not None:
    images = augment.train(images, state.step,
                           augment_lib.example_index(labels.shape[0], axis_name))

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    return cross_entropy(logits, labels).mean(), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
  lr = lr_fn(state.step, state.schedule)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
  count = jnp.float32(labels.shape[0])
  metrics = _reduce({'loss': loss * count, 'count': count,
                     **_error_sums(logits, labels, jnp.ones_like(labels, jnp.float32))}, axis_name)
  metrics['learning_rate'] = lr
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def mirror_on_canvas(images: jax.Array, valid: jax.Array) -> jax.Array:
  """Each image (at the top left of its canvas, where `valid`) mirrored left-right in place,
  so the mirror too starts at the left edge (the canvas beyond it keeps its values)."""
  width = jnp.sum(valid[:, 0, :], axis=1, dtype=jnp.int32)[:, None]  # (batch, 1)
  columns = jnp.arange(images.shape[2])[None, :]
  source = jnp.where(columns < width, width - 1 - columns, columns)
  return jnp.take_along_axis(images, source[:, None, :, None], axis=2)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              augment: augment_lib.DeviceAugment | None = None,
              axis_name: str | None = None) -> dict[str, jax.Array]:
  """Summed loss and errors over the unmasked examples; 10-crop and multi-scale batches
  average the views' softmax (in log space)."""
  labels = batch['label']
  weights = batch['mask'].astype(jnp.float32)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if 'scales' in batch:  # fully-convolutional testing at several sizes, and mirrored
    views = []
    for scale in batch['scales'].values():
      valid = scale['valid']
      images = (scale['image'] if augment is None
                else augment.eval(scale['image'], whole_images=True))
      for view in (images, mirror_on_canvas(images, valid)):
        views.append(model.apply(variables, view, train=False, valid=valid))
    logits = average_crops(jnp.stack(views, axis=1))
    loss = cross_entropy(logits, labels)
    return _reduce({'loss': jnp.sum(loss * weights), 'count': jnp.sum(weights),
                    **_error_sums(logits, labels, weights)}, axis_name)
  images = batch['image']
  if augment is not None:
    images = augment.eval(images)
  if images.ndim == 5:  # (batch, crops, H, W, C): average the crops' probabilities
    n, crops = images.shape[:2]
    logits = model.apply(variables, images.reshape((n * crops,) + images.shape[2:]), train=False)
    logits = average_crops(logits.reshape(n, crops, -1))
  else:
    logits = model.apply(variables, images, train=False)
  loss = cross_entropy(logits, labels)
  return _reduce({'loss': jnp.sum(loss * weights), 'count': jnp.sum(weights),
                  **_error_sums(logits, labels, weights)}, axis_name)


def make_steps(model: nn.Module, tx: optax.GradientTransformation,
               lr_fn: Callable[[Any, optim.ScheduleState], Any], axis_name: str | None = None,
               augment: augment_lib.DeviceAugment | None = None) -> tuple[Callable, Callable]:
  """The two step functions with everything static bound; ready for jit or pmap.

  `lr_fn(step, schedule_state)`: the learning rate (optim.learning_rate with the schedule
  bound). `augment`: what turns the input pipeline's uint8 images into model inputs
  (None: batches already hold them).
  """
  return (functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn, augment=augment,
                            axis_name=axis_name),
          functools.partial(eval_step, model=model, augment=augment, axis_name=axis_name))
