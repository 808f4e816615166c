"""The training system: steps, jit == pmap, optimizer, schedules, loop, bad input."""
import os
import re
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import assembly
from resnet_jax import backend
from resnet_jax import checkpointing
from resnet_jax import config_checks
from resnet_jax import errors
from resnet_jax import evaluation
from resnet_jax import models
from resnet_jax import optim
from resnet_jax import run_log
from resnet_jax import steps
from resnet_jax import train
from tests.conftest import DEVICES
from tests.support import helpers
from tests.test_checkpoints import assert_trees_close

SHAPE = (16, 16, 3)


def _batches(num, batch_size, seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  return [{'image': rng.normal(size=(batch_size,) + SHAPE).astype(np.float32),
           'label': rng.integers(0, num_classes, size=batch_size).astype(np.int32)}
          for _ in range(num)]


def _strategy(config, num_classes=10):
  """The trainer's strategy for `config`, with the kernels it would choose (the CPU plugin
  only where $RESNET_JAX_CPU_KERNELS leaves config.cpu_kernels=auto on)."""
  kernels = backend.choose_cpu_kernels(config.cpu_kernels).model_options
  return assembly.create_strategy(
      config, lambda axis: models.create_model_from_config(config.model, num_classes,
                                                           bn_axis_name=axis, **kernels),
      SHAPE, steps_per_epoch=10, steps_total=100)


def _train(config, batches):
  strategy = _strategy(config)
  state = strategy.init_state(jax.random.key(0))
  losses = []
  for batch in batches:
    state, metrics = strategy.train_step(state, strategy.put_batch(batch))
    losses.append(strategy.metrics_to_host(metrics)['loss'] / config.batch_size)
  return strategy.to_host(state), losses


@pytest.mark.end_to_end
def test_loss_falls_on_a_fixed_batch():
  config = helpers.small_config(batch_size=16)
  batch = _batches(1, 16)[0]
  _, losses = _train(config, [batch] * 30)
  assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.end_to_end
@pytest.mark.parametrize('bn_group_size', [0, 2])
def test_jit_and_pmap_give_the_same_numbers(bn_group_size):
  """Every step of pmap equals the jit step from the same state, to float rounding.

  Each step is compared from a common state: free-running float32 trajectories
  of a tiny net on noise drift apart after a few steps whatever the code does
  (a ReLU input within rounding of zero flips), which would test luck, not code.
  """
  assert jax.device_count() == DEVICES
  batches = _batches(4, 16, seed=1)
  configs = {mode: helpers.small_config(parallel=mode, batch_size=16,
                                        **{'model.bn_group_size': bn_group_size})
             for mode in ('jit', 'pmap')}
  jit, pmap = _strategy(configs['jit']), _strategy(configs['pmap'])
  state = jit.init_state(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, jit.to_host(state),
               pmap.to_host(pmap.init_state(jax.random.key(0))))
  for batch in batches:
    start = jit.to_host(state)
    pmap_state, pmap_metrics = pmap.train_step(pmap.replicate(start), pmap.put_batch(batch))
    state, jit_metrics = jit.train_step(state, jit.put_batch(batch))
    jit_metrics, pmap_metrics = jit.metrics_to_host(jit_metrics), pmap.metrics_to_host(pmap_metrics)
    assert jit_metrics.keys() == pmap_metrics.keys()
    for key in jit_metrics:
      np.testing.assert_allclose(pmap_metrics[key], jit_metrics[key], rtol=1e-6, err_msg=key)
    assert_trees_close(pmap.to_host(pmap_state), jit.to_host(state), rtol=1e-5)
  assert int(state.step) == 4
  # The free-running losses agree too: to rounding for two steps, then within the
  # drift that last-bit differences grow into on this net (with oneDNN kernel
  # gradients: 6.5e-4 relative at step 4, while each step's parameters differ
  # by at most 1.2e-7, as with XLA's).
  _, jit_losses = _train(configs['jit'], batches)
  _, pmap_losses = _train(configs['pmap'], batches)
  np.testing.assert_allclose(pmap_losses[:2], jit_losses[:2], rtol=1e-5)
  np.testing.assert_allclose(pmap_losses, jit_losses, rtol=1e-2)
  # The two BN semantics really differ: ghost statistics give other running statistics.
  if bn_group_size:
    whole, _ = _train(helpers.small_config(batch_size=16), batches[:1])
    ghost, _ = _train(helpers.small_config(batch_size=16, **{'model.bn_group_size': 2}),
                      batches[:1])
    stats = lambda s: s.batch_stats['stage1_block1']['bn1']['var']
    assert not np.allclose(stats(whole), stats(ghost))


def test_ghost_bn_over_devices_equals_per_device_statistics():
  """bn_group_size = per-device batch under jit reproduces per-GPU BN (the paper's setting)."""
  batch = _batches(1, 16, seed=2)[0]
  config = helpers.small_config(batch_size=16, **{'model.bn_group_size': 2})
  model = models.create_model_from_config(config.model, 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE), train=False)
  ghost, _ = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
  per_device = [model.apply(variables, batch['image'][i:i + 2], train=True,
                            mutable=['batch_stats'])[0] for i in range(0, 16, 2)]
  np.testing.assert_allclose(ghost, np.concatenate(per_device), rtol=1e-4, atol=1e-5)


def test_sgd_update_is_momentum_with_l2_on_kernels_only():
  config = helpers.small_config()
  config.optimizer.weight_decay = 0.1
  tx = optim.create_optimizer(config.optimizer)
  params = {'conv': {'kernel': jnp.ones((2,))}, 'bn': {'scale': jnp.ones((2,)),
                                                       'bias': jnp.ones((2,))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  opt_state = tx.init(params)
  u1, opt_state = tx.update(grads, opt_state, params)
  np.testing.assert_allclose(u1['conv']['kernel'], 0.5 + 0.1)  # g + wd * w
  np.testing.assert_allclose(u1['bn']['scale'], 0.5)           # BN not decayed
  u2, _ = tx.update(grads, opt_state, params)
  np.testing.assert_allclose(u2['conv']['kernel'], 0.9 * 0.6 + 0.6)  # momentum trace
  config.optimizer.decay_bn_and_bias = True
  u, _ = optim.create_optimizer(config.optimizer).update(grads, tx.init(params), params)
  np.testing.assert_allclose(u['bn']['bias'], 0.6)


def _lr(config, step, state=None, steps_per_epoch=100, total=64000):
  schedule = optim.schedule_fn(config.schedule,
                               optim.base_learning_rate(config.optimizer, config.batch_size),
                               steps_per_epoch, total)
  state = state or optim.init_schedule_state(config.schedule)
  return float(optim.learning_rate(config.schedule, schedule, jnp.int32(step), state))


def test_paper_cifar_step_schedule_boundaries():
  config = helpers.small_config(**{'schedule.name': 'step', 'schedule.unit': 'steps',
                                   'schedule.boundaries': (32000, 48000)})
  assert _lr(config, 0) == pytest.approx(0.1)
  assert _lr(config, 31999) == pytest.approx(0.1)
  assert _lr(config, 32000) == pytest.approx(0.01)
  assert _lr(config, 47999) == pytest.approx(0.01)
  assert _lr(config, 48000) == pytest.approx(0.001)
  assert _lr(config, 63999) == pytest.approx(0.001)
  # The same in epochs (100 steps per epoch).
  config.schedule.unit = 'epochs'
  config.schedule.boundaries = (320.0, 480.0)
  assert _lr(config, 31999) == pytest.approx(0.1) and _lr(config, 32000) == pytest.approx(0.01)


def test_resnet110_warmup_returns_to_the_schedule():
  config = helpers.small_config(**{'schedule.name': 'step', 'schedule.unit': 'steps',
                                   'schedule.boundaries': (32000, 48000),
                                   'schedule.warmup_lr': 0.01})
  state = optim.init_schedule_state(config.schedule)
  assert _lr(config, 0, state) == pytest.approx(0.01)
  state = optim.after_train_log(config.schedule, state, 0.85)   # still above 80%
  assert _lr(config, 300, state) == pytest.approx(0.01)
  state = optim.after_train_log(config.schedule, state, 0.79)   # below 80%: back to 0.1
  assert _lr(config, 400, state) == pytest.approx(0.1)
  assert _lr(config, 32000, state) == pytest.approx(0.01)
  state = optim.after_train_log(config.schedule, state, 0.95)   # never warms up again
  assert _lr(config, 401, state) == pytest.approx(0.1)


def test_plateau_divides_by_ten_when_eval_error_stops_improving():
  config = helpers.small_config(**{'schedule.name': 'plateau', 'schedule.patience': 2,
                                   'schedule.factor': 0.1})
  state = optim.init_schedule_state(config.schedule)
  for error, expected in [(0.5, 0.1), (0.4, 0.1), (0.4, 0.1), (0.41, 0.01), (0.45, 0.01),
                          (0.39, 0.01), (0.39, 0.01), (0.39, 0.001)]:
    state = optim.after_eval(config.schedule, state, error)
    assert _lr(config, 1000, state) == pytest.approx(expected)


def test_cosine_with_linear_warmup_and_batch_scaling():
  config = helpers.small_config(**{'schedule.name': 'cosine', 'schedule.unit': 'epochs',
                                   'schedule.warmup_length': 5.0, 'batch_size': 1024,
                                   'optimizer.base_batch_size': 256})
  peak = 0.1 * 1024 / 256
  assert _lr(config, 0, total=9000) == pytest.approx(0.0)
  assert _lr(config, 250, total=9000) == pytest.approx(peak / 2)
  assert _lr(config, 500, total=9000) == pytest.approx(peak)
  assert _lr(config, 4750, total=9000) == pytest.approx(peak / 2, rel=1e-3)
  assert _lr(config, 9000, total=9000) == pytest.approx(0.0, abs=1e-6)


def test_eval_step_scores_masked_batches_and_ten_crops():
  config = helpers.small_config()
  model = models.create_model_from_config(config.model, 10)
  tx = optim.create_optimizer(config.optimizer)
  state = steps.create_train_state(model, tx, optim.init_schedule_state(config.schedule), SHAPE,
                                   jax.random.key(0))
  batch = _batches(1, 8)[0]
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 1], bool)
  _, eval_fn = steps.make_steps(model, tx, lambda step, schedule: 0.1)
  full = eval_fn(state, {**batch, 'mask': np.ones(8, bool)})
  masked = eval_fn(state, {**batch, 'mask': mask})
  assert float(masked['count']) == 5
  keep = {k: v[mask] for k, v in batch.items()}
  only = eval_fn(state, {**keep, 'mask': np.ones(5, bool)})
  for key in ('loss', 'top1_error', 'top5_error'):
    np.testing.assert_allclose(masked[key], only[key], rtol=1e-5)
  assert float(full['count']) == 8


def test_batch_not_divisible_by_devices_fails_clearly():
  config = helpers.small_config(batch_size=12)
  with pytest.raises(ValueError, match='batch_size=12 is not divisible by the 8 devices'):
    config_checks.validate(config, 8)
  config = helpers.small_config(parallel='pmap', batch_size=16, **{'model.bn_group_size': 4})
  with pytest.raises(ValueError, match='bn_group_size=4 does not divide the per-device batch of 2'):
    config_checks.validate(config, 8)
  config_checks.validate(helpers.small_config(batch_size=16, **{'model.bn_group_size': 4}), 8)
  with pytest.raises(ValueError, match="config.parallel='pjit'"):
    config_checks.validate(helpers.small_config(parallel='pjit'), 8)
  with pytest.raises(ValueError, match="config.parallel='pjit'"):
    _strategy(helpers.small_config(parallel='pjit'))


def test_non_finite_loss_stops_training_and_keeps_the_checkpoint(tmp_path, digits_dir):
  # The learning rate jumps to 1e29 after step 4, and the loss overflows a few steps later
  # (which step depends on rounding). Every step is logged, checked and then saved.
  config = helpers.small_config(**{
      'data.data_dir': digits_dir, 'num_train_steps': 12, 'checkpoint_every_steps': 1,
      'log_every_steps': 1, 'eval_every_steps': 100, 'schedule.name': 'step',
      'schedule.unit': 'steps', 'schedule.boundaries': (4,), 'schedule.factor': 1e30})
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  found = re.search(r'training loss is (nan|inf|-inf) at step (\d+): training stopped without '
                    r'saving this state. The last good checkpoint is at step (\d+) in',
                    str(error.value))
  assert found, str(error.value)
  bad, last_good = int(found.group(2)), int(found.group(3))
  assert 5 <= bad <= 12 and last_good == bad - 1
  assert max(int(step) for step in os.listdir(tmp_path / 'checkpoints')) == last_good


def test_non_finite_eval_loss_stops_training_and_is_never_saved(tmp_path, digits_dir,
                                                                monkeypatch):
  """A diverged evaluation must not become the best checkpoint or feed the plateau rule."""
  real_evaluate, calls = train.evaluate, []

  def diverging_evaluate(*args, **kwargs):
    metrics = real_evaluate(*args, **kwargs)
    calls.append(metrics['eval_top1_error'])
    return {**metrics, 'eval_loss': float('nan')} if len(calls) == 2 else metrics

  monkeypatch.setattr(train, 'evaluate', diverging_evaluate)
  rules = []
  monkeypatch.setattr(optim, 'after_eval', lambda config, state, error: rules.append(error) or state)
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'num_train_steps': 12,
                                   'eval_every_steps': 2, 'checkpoint_every_steps': 2})
  with pytest.raises(errors.DivergedError, match=r'The eval loss is nan at step 4: training '
                     r'stopped without saving this state. The last good checkpoint is at step 2'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints')) == [2]
  assert rules == calls[:1]  # the plateau rule saw only the finite evaluation
  lines = helpers.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [line['step'] for line in lines if 'eval_loss' in line] == [2]


def test_a_pending_evaluation_that_diverges_moves_its_checkpoint_aside(tmp_path, digits_dir,
                                                                       monkeypatch):
  """SIGTERM stopped the evaluation of step 4; after the restart that evaluation gives NaN:
  the saved state is diverged, so it goes to damaged_checkpoints and the next run resumes
  from step 3 (instead of evaluating the bad state again at every restart)."""
  real_evaluate = train.evaluate
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'num_train_steps': 6,
                                   'eval_every_steps': 4, 'checkpoint_every_steps': 1})
  monkeypatch.setattr(train, 'evaluate', lambda *args, **kwargs: None)  # as SIGTERM stops it
  with pytest.raises(train.Preempted, match='saved a checkpoint at step 4'):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(train, 'evaluate', lambda *args, **kwargs: {
      **real_evaluate(*args, **kwargs), 'eval_loss': float('nan')})
  with pytest.raises(errors.DivergedError, match='The last good checkpoint is at step 3'):
    train.train_and_evaluate(config, str(tmp_path))
  (moved,) = os.listdir(tmp_path / 'damaged_checkpoints')
  assert moved.startswith('4-')
  assert 'diverged' in (tmp_path / 'damaged_checkpoints' / moved / 'WHY_DAMAGED.txt').read_text()
  monkeypatch.setattr(train, 'evaluate', real_evaluate)
  train.train_and_evaluate(config, str(tmp_path))
  lines = helpers.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [line['step'] for line in lines if 'eval_loss' in line] == [4, 6]
  assert [line['step'] for line in lines if 'train_loss' in line] == [2, 4, 6]


def test_images_per_sec_counts_training_steps_only(tmp_path, digits_dir, monkeypatch):
  """Evaluation and checkpoint saves are not training time.

  The trainer's clock is the real one plus 1000 s for each evaluation and save, so
  the check does not depend on how fast (or how loaded) the machine is.
  """
  real_evaluate, real_save = train.evaluate, checkpointing.Checkpoints.save
  real_monotonic, offset = time.monotonic, [0.0]

  def slow(fn):
    def wrapped(*args, **kwargs):
      offset[0] += 1000.0
      return fn(*args, **kwargs)
    return wrapped

  # Only the training clock's module sees the shifted clock (asyncio and orbax keep theirs).
  monkeypatch.setattr(run_log, 'time', types.SimpleNamespace(
      monotonic=lambda: real_monotonic() + offset[0]))
  monkeypatch.setattr(train, 'evaluate', slow(real_evaluate))
  monkeypatch.setattr(checkpointing.Checkpoints, 'save', slow(real_save))
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'num_train_steps': 6,
                                   'log_every_steps': 2, 'eval_every_steps': 4,
                                   'checkpoint_every_steps': 4})
  train.train_and_evaluate(config, str(tmp_path))
  assert offset[0] >= 2000.0  # the step-4 evaluation and save happened
  lines = helpers.read_jsonl(tmp_path / 'metrics.jsonl')
  rate = {line['step']: line['images_per_sec'] for line in lines if 'images_per_sec' in line}
  # Steps 5-6 follow the evaluation and the save at step 4 (2000 s and more on the
  # trainer's clock). Counted in, they would make the rate at most 2 steps x 16 images
  # / 2000 s = 0.016 images/s; two real steps of 16 tiny images take far under 30 s.
  assert sorted(rate) == [2, 4, 6]
  assert rate[6] > 1.0, rate


def test_bfloat16_training_follows_float32():
  """Mixed precision: bf16 compute, float32 params and BN statistics, the same losses within 2%."""
  batches = _batches(5, 16, seed=3)
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    runs[dtype] = _train(helpers.small_config(**{'model.dtype': dtype,
                                                 'optimizer.learning_rate': 0.01}), batches)
  (_, f32_losses), (bf16_state, bf16_losses) = runs['float32'], runs['bfloat16']
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=0.02)
  assert bf16_losses != f32_losses  # it really computed in bfloat16
  assert {x.dtype for x in jax.tree.leaves((bf16_state.params, bf16_state.batch_stats))} == {
      np.dtype('float32')}


class Echo(nn.Module):
  """A "network" whose logits are the first pixel's channels: tests choose the logits."""

  @nn.compact
  def __call__(self, x, train=False):
    scale = self.param('scale', nn.initializers.ones, ())
    return x[:, 0, 0, :] * scale


def _echo_steps(num_classes):
  config = helpers.small_config()
  model, tx = Echo(), optim.create_optimizer(config.optimizer)
  state = steps.create_train_state(model, tx, optim.init_schedule_state(config.schedule),
                                   (1, 1, num_classes), jax.random.key(0))
  train_fn, eval_fn = steps.make_steps(model, tx, lambda step, schedule: 0.1)
  return state, jax.jit(train_fn), jax.jit(eval_fn)


NAN, INF = float('nan'), float('inf')
# (logits over 6 classes, label, top-1 correct, top-5 correct)
TOPK_CASES = [
    ([3, 0, 1, 2, -1, -2], 0, True, True),       # the best, strictly
    ([3, 0, 1, 2, -1, -2], 1, False, True),      # fourth best
    ([3, 0, 1, 2, -1, -2], 5, False, False),     # the worst
    ([1, 1, 0, 0, 0, 0], 0, False, True),        # tied for the best: a tie is not a win
    ([0, 0, 0, 0, 0, 0], 3, False, False),       # collapsed net: all tied
    ([0, 0, 0, 0, 0, 1], 3, False, False),       # tied with four others below the best
    ([NAN, 0, -1, -2, -3, -4], 1, False, True),  # a NaN elsewhere counts against the label
    ([0, NAN, -1, -2, -3, -4], 1, False, False), # the label's logit is NaN
    ([NAN] * 6, 2, False, False),                # diverged
    ([0, INF, -1, -2, -3, -4], 1, False, False), # the label's logit is +inf
    ([0, 1, -INF, -INF, -INF, -INF], 1, True, True),
    ([INF, 1, 0, 0, 0, 0], 1, False, True),
]


def test_top_k_counts_ties_and_non_finite_logits_as_errors():
  logits = jnp.array([case[0] for case in TOPK_CASES], jnp.float32)
  labels = jnp.array([case[1] for case in TOPK_CASES], jnp.int32)
  top1 = [case[2] for case in TOPK_CASES]
  top5 = [case[3] for case in TOPK_CASES]
  assert steps.topk_correct(logits, labels, 1).tolist() == top1
  assert steps.topk_correct(logits, labels, 5).tolist() == top5

  # The same through the train step and the eval step (one crop and ten).
  state, train_fn, eval_fn = _echo_steps(6)
  images = np.asarray(logits)[:, None, None, :]
  expected = {'top1_error': top1.count(False), 'top5_error': top5.count(False)}
  _, train_metrics = train_fn(state, {'image': images, 'label': labels})
  mask = np.ones(len(labels), bool)
  eval_metrics = eval_fn(state, {'image': images, 'label': labels, 'mask': mask})
  ten = np.repeat(images[:, None], 10, axis=1)  # ten crops with the same logits
  ten_metrics = eval_fn(state, {'image': ten, 'label': labels, 'mask': mask})
  for metrics in (train_metrics, eval_metrics):
    assert {k: int(metrics[k]) for k in expected} == expected, metrics
  # Averaged crops: a NaN or +inf logit anywhere makes that example's probabilities
  # undefined, so two more examples (a NaN elsewhere, a +inf elsewhere) are top-5 errors.
  undefined = [i for i, case in enumerate(TOPK_CASES)
               if np.isnan(case[0]).any() or np.isposinf(case[0]).any()]
  ten_expected = {'top1_error': sum(not c or i in undefined for i, c in enumerate(top1)),
                  'top5_error': sum(not c or i in undefined for i, c in enumerate(top5))}
  assert ten_expected == {'top1_error': 10, 'top5_error': 8}
  assert {k: int(ten_metrics[k]) for k in expected} == ten_expected, ten_metrics
  # One diverged crop (NaN) makes the averaged example an error.
  ten[0, 3, 0, 0, :] = NAN
  ten_metrics = eval_fn(state, {'image': ten, 'label': labels, 'mask': mask})
  assert int(ten_metrics['top1_error']) == expected['top1_error'] + 1
  assert not np.isfinite(float(ten_metrics['loss']))


def test_ten_crop_averages_probabilities_in_log_space():
  state, _, eval_fn = _echo_steps(1000)
  mask = np.ones(2, bool)
  # Example 0: one crop very sure of class 0, nine fairly sure of class 1. The mean
  # probability favours class 1 (0.86 vs 0.10); the mean logit class 0 (10 vs 9).
  crops = np.zeros((2, 10, 1000), np.float32)
  crops[0, 0, 0] = 100.0
  crops[0, 1:, 1] = 10.0
  # Example 1: the label's probability is about e^-200 in every crop, below float32's
  # smallest number, but it is still the second best class: top-5, not top-1.
  crops[1, :, :] = -300.0
  crops[1, :, 0] = 0.0
  crops[1, :, 1] = -200.0
  labels = np.array([1, 1], np.int32)
  metrics = eval_fn(state, {'image': crops[:, :, None, None, :], 'label': labels, 'mask': mask})
  assert int(metrics['top1_error']) == 1 and int(metrics['top5_error']) == 0
  x = crops.astype(np.float64)
  log_probs = x - x.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  mean_probs = np.exp(log_probs).mean(axis=1)
  expected_loss = -np.log(mean_probs[0, 1]) + 200.0  # example 1: -log(e^-200)
  np.testing.assert_allclose(float(metrics['loss']), expected_loss, rtol=1e-5)
  averaged = steps.average_crops(jnp.asarray(crops))
  assert int(jnp.argmax(averaged[0])) == 1 and int(jnp.argmax(crops[0].mean(0))) == 0


class _Loader:
  """An eval loader that records its close() (grain's workers stop there)."""

  def __init__(self):
    self.closed = False

  def __iter__(self):
    return iter([{'image': np.zeros((2, 8, 8, 3), np.uint8)}] * 3)

  def close(self) -> None:
    self.closed = True


def test_an_evaluation_stopped_early_or_failing_closes_its_loader():
  loader = _Loader()
  assert evaluation.evaluate(None, None, loader, stop=lambda: True) is None  # a SIGTERM
  assert loader.closed
  loader = _Loader()

  def fails():
    raise errors.DataError('a corrupt record')
  with pytest.raises(errors.DataError):
    evaluation.evaluate(None, None, loader, stop=fails)
  assert loader.closed
