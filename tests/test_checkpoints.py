"""Checkpoints: exact resume after SIGTERM, retention, eval on other device counts, bad files."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.support import helpers

from tests.conftest import DEVICES, TRAIN
RESULT_KEYS = ('train_', 'eval_', 'learning_rate')


def saved_state(workdir, step=None):
  """A checkpoint's train state as numpy arrays, read with orbax directly."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers={'state': ocp.StandardCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever wrote it
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)['state'])
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return step, jax.tree.map(np.asarray, dict(state['state']))


def results(workdir):
  """metrics.jsonl without the timing lines (steps/s, uptime differ between runs)."""
  return [line for line in helpers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if any(key.startswith(RESULT_KEYS) for key in line)]


def assert_same_state(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def assert_trees_close(actual, expected, rtol):
  """Each leaf within rtol of the expected leaf's norm (elementwise rtol fails on zeros)."""
  def check(path, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    np.testing.assert_array_equal(a[~finite], b[~finite])  # e.g. a best error of inf
    a, b = a[finite], b[finite]
    assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b) + 1e-12, (
        f'{jax.tree_util.keystr(path)}: |diff| {np.linalg.norm(a - b):.3g}, '
        f'|expected| {np.linalg.norm(b):.3g}')
  jax.tree_util.tree_map_with_path(check, actual, expected)


SLOW_EVAL = """
import dataclasses, os, time
from resnet_jax import parallel
_create = parallel.create

def _slow_create(*args, **kwargs):
  strategy = _create(*args, **kwargs)
  def eval_step(state, batch):
    with open(os.environ['EVAL_STARTED'], 'a') as f:
      f.write('batch\\n')
    time.sleep(3)
    return strategy.eval_step(state, batch)
  return dataclasses.replace(strategy, eval_step=eval_step)

parallel.create = _slow_create
"""


def _start(workdir, args, prelude='', env=None, start_new_session=False):
  code = (f'{prelude}\nimport runpy, sys\nsys.argv = ["run.py", "--workdir={workdir}"] + {args!r}\n'
          f'runpy.run_path({os.path.join(helpers.REPO, "run.py")!r}, run_name="__main__")\n')
  return subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=helpers.REPO,
                          env={**os.environ, **(env or {})},
                          start_new_session=start_new_session)


def _wait_for(process, ready, timeout=300):
  deadline = time.time() + timeout
  while not ready():
    assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
    time.sleep(0.05)


def _assert_resumes_exactly(workdir, args, straight):
  helpers.run_py(f'--workdir={workdir}', *args)  # the same command continues
  step, resumed = saved_state(workdir)
  _, expected = saved_state(straight)
  assert step == 24
  assert_same_state(resumed, expected)  # params, BN statistics, optimizer and schedule state
  assert results(workdir) == results(straight)


@pytest.mark.end_to_end
def test_sigterm_then_resume_is_bitwise_identical(tmp_path, digits_dir, straight):
  args = [f'--config.data.data_dir={digits_dir}', '--config.num_train_steps=24', *TRAIN]
  workdir = tmp_path / 'preempted'
  process = _start(workdir, args)
  metrics = workdir / 'metrics.jsonl'
  _wait_for(process, lambda: metrics.exists() and '"train_loss"' in metrics.read_text())
  process.send_signal(signal.SIGTERM)  # past step 4
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert 'SIGTERM: saved a checkpoint at step' in stderr
  stopped_at, _ = saved_state(workdir)
  assert 4 <= stopped_at < 24  # stopped early, mid-window and mid-epoch in general
  _assert_resumes_exactly(workdir, args, straight)


def test_sigterm_during_a_slow_evaluation_saves_at_once_and_resumes_exactly(tmp_path, digits_dir,
                                                                            straight):
  """The evaluation is stopped (not waited for): 6 batches of 3 s here, stopped in the first.

  The checkpoint holds the state before the evaluation; the restarted run
  evaluates it first, so the metrics and the final state match an
  uninterrupted run's.
  """
  args = [f'--config.data.data_dir={digits_dir}', '--config.num_train_steps=24', *TRAIN]
  workdir, started = tmp_path / 'preempted', tmp_path / 'eval_started'
  process = _start(workdir, args, prelude=SLOW_EVAL, env={'EVAL_STARTED': str(started)})
  _wait_for(process, started.exists)
  process.send_signal(signal.SIGTERM)  # during the first batch's 3 s
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert 'SIGTERM during the evaluation at step 6: stopped it to save.' in stderr
  assert 'SIGTERM: saved a checkpoint at step 6' in stderr
  # Bounded by one batch: the evaluation did not go on to its second. (Counted rather
  # than timed: a loaded machine's start-up and compile times vary by tens of seconds.)
  assert started.read_text() == 'batch\n'
  assert saved_state(workdir)[0] == 6
  assert not [line for line in results(workdir) if 'eval_loss' in line]
  # Stopped again while the restarted run evaluates step 6 first: nothing new to save.
  started.unlink()
  process = _start(workdir, args, prelude=SLOW_EVAL, env={'EVAL_STARTED': str(started)})
  _wait_for(process, started.exists)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert 'SIGTERM during the evaluation at step 6' in stderr and 'Traceback' not in stderr
  assert saved_state(workdir)[0] == 6
  _assert_resumes_exactly(workdir, args, straight)


def _copy(trained, tmp_path):
  shutil.copytree(trained, tmp_path / 'w')
  return tmp_path / 'w'


def test_rerun_after_the_end_changes_nothing(trained, tmp_path, digits_dir):
  workdir = _copy(trained, tmp_path)
  before = results(workdir)
  out = helpers.run_py(f'--workdir={workdir}', f'--config.data.data_dir={digits_dir}',
                       '--config.num_train_steps=12', *TRAIN)
  assert 'already trained for 12 steps' in out.stderr
  assert results(workdir) == before


def test_keeps_the_last_k_and_the_best(tmp_path, digits_dir):
  helpers.run_py(f'--workdir={tmp_path}', f'--config.data.data_dir={digits_dir}',
                 '--config.num_train_steps=10', '--config.batch_size=16',
                 '--config.eval_batch_size=64', '--config.eval_every_steps=1',
                 '--config.checkpoint_every_steps=1', '--config.keep_checkpoints=2',
                 '--config.optimizer.learning_rate=0.5')
  errors = {line['step']: line['eval_top1_error'] for line in results(tmp_path)
            if 'eval_top1_error' in line}
  best = min(errors, key=lambda s: (errors[s], -s))
  kept = sorted(map(int, os.listdir(tmp_path / 'checkpoints')))
  assert kept == sorted({9, 10, best}), (kept, errors)
  out = helpers.run_py('--mode=eval', f'--workdir={tmp_path}', '--checkpoint=best').stdout
  assert json.loads(out[out.index('{'):])['step'] == best


@pytest.mark.parametrize('train_devices,eval_devices', [(DEVICES, 1), (1, DEVICES)])
def test_eval_restores_on_another_device_count(trained, tmp_path, digits_dir, train_devices,
                                               eval_devices):
  flags = lambda n: {'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
  if train_devices == DEVICES:  # the conftest's
    workdir = _copy(trained, tmp_path)
  else:
    workdir = tmp_path
    helpers.run_py(f'--workdir={workdir}', f'--config.data.data_dir={digits_dir}',
                   '--config.num_train_steps=12', *TRAIN, env=flags(train_devices))
  final = [line for line in results(workdir) if 'eval_top1_error' in line][-1]
  out = helpers.run_py('--mode=eval', f'--workdir={workdir}', env=flags(eval_devices))
  printed = json.loads(out.stdout[out.stdout.index('{'):])
  with open(workdir / 'eval_results.json') as f:
    saved = json.load(f)
  assert printed == saved
  assert saved['step'] == 12 and saved['checkpoint'] == 'latest' and saved['num_examples'] == 360
  assert saved['num_devices'] == eval_devices
  assert saved['top1_error'] == pytest.approx(final['eval_top1_error'], abs=1e-9)
  assert saved['top5_error'] == pytest.approx(final['eval_top5_error'], abs=1e-9)


def test_eval_uses_the_saved_config_with_overrides(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  out = helpers.run_py('--mode=eval', f'--workdir={workdir}', '--config.data.eval_split=train',
                       '--config.eval_batch_size=200').stdout
  result = json.loads(out[out.index('{'):])
  assert result['split'] == 'train' and result['num_examples'] == 1437


def test_damaged_and_mismatched_checkpoints_fail_clearly(trained, tmp_path, digits_dir):
  tmp_path = _copy(trained, tmp_path)
  args = [f'--workdir={tmp_path}', f'--config.data.data_dir={digits_dir}', *TRAIN]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['12', '6']
  # A checkpoint of another model: a clear error, nothing overwritten.
  out = helpers.run_py('--mode=eval', f'--workdir={tmp_path}', '--config.model.name=resnet32',
                       check=False)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'does not fit the configured model' in out.stderr
  assert 'stage1_block4' in out.stderr
  # Damage the newest checkpoint: eval says so; training falls back to step 6 and goes on.
  shutil.rmtree(tmp_path / 'checkpoints' / '12' / 'state')
  out = helpers.run_py('--mode=eval', f'--workdir={tmp_path}', '--checkpoint=12', check=False)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'checkpoints/12 cannot be read' in out.stderr and 'damaged' in out.stderr
  out = helpers.run_py(*args, '--config.num_train_steps=18')
  assert 'Resuming from step 6' in out.stderr
  assert sorted(map(int, os.listdir(tmp_path / 'checkpoints')))[-1] == 18
  out = helpers.run_py('--mode=eval', f'--workdir={tmp_path}', '--checkpoint=7', check=False)
  assert 'use latest, best or a saved step' in out.stderr


# Written on 2026-12-01 by the code of commit 35945a9, before the CPU kernels left the
# model: resnet20, 2 steps of batch 16 on the digits (1 XLA device), its config.json
# (which names model options that no longer exist) and metrics.jsonl.
OLD_WORKDIR = os.path.join(helpers.REPO, 'tests', 'data', 'workdir_2026_12_01')


def test_a_workdir_written_before_the_pure_model_evaluates_and_resumes(tmp_path, digits_dir):
  workdir = tmp_path / 'w'
  shutil.copytree(OLD_WORKDIR, workdir)
  data = f'--config.data.data_dir={digits_dir}'
  out = helpers.run_py('--mode=eval', f'--workdir={workdir}', data, env={'XLA_FLAGS': ''})
  result = json.loads(out.stdout[out.stdout.index('{'):])
  (then,) = [line for line in results(workdir) if 'eval_loss' in line]
  assert result['step'] == 2 and result['num_examples'] == 360
  assert result['top1_error'] == pytest.approx(then['eval_top1_error'], abs=1.5 / 360)
  # That run's images were resized by TensorFlow, these by OpenCV: the same bilinear sampling,
  # rounded differently by at most one grey level in some pixels (tests/test_image_ops.py).
  assert result['loss'] == pytest.approx(then['eval_loss'], rel=1e-3)
  # Training continues from it with the same parameter names and state layout.
  helpers.run_py(f'--workdir={workdir}', data, '--config.num_train_steps=4',
                 '--config.batch_size=16', '--config.eval_batch_size=120',
                 '--config.log_every_steps=1', '--config.eval_every_steps=2',
                 '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=1',
                 env={'XLA_FLAGS': ''})
  assert saved_state(workdir)[0] == 4
  assert [line['step'] for line in results(workdir) if 'train_loss' in line] == [1, 2, 3, 4]


def test_export_gives_the_eval_models_logits_for_any_batch_size(trained, tmp_path):
  from configs import default  # pylint: disable=import-outside-toplevel
  from resnet_jax import backend, checkpointing, config_lib, export, models, train  # pylint: disable=import-outside-toplevel
  from resnet_jax.data import eval_stream  # pylint: disable=import-outside-toplevel
  workdir = _copy(trained, tmp_path)
  out = helpers.run_py('--mode=export', f'--workdir={workdir}')
  info = json.loads(out.stdout[out.stdout.index('{'):])
  assert info['step'] == 12 and info['file'].endswith('export/resnet20_step12.jax_exported')
  exported = export.load(info['file'])
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  calls = set(re.findall(r'custom_call @(\w+)', exported.mlir_module()))
  assert calls <= {'shape_assertion'}, calls  # plain lax: no CPU plugin inside

  # --mode=eval's model: the saved config, the restored state, eval images.
  config = config_lib.load_saved_config(workdir, default.get_config(), {})
  run = train.setup(config)
  ckpt = checkpointing.Checkpoints(workdir)
  state, _ = ckpt.restore(12, run.strategy.abstract_state(jax.random.key(0)))
  ckpt.close()
  model = models.create_model_from_config(config.model, run.inp.num_classes,
                                          **backend.model_defaults(config.model))
  images = eval_stream.eval_dataset(config.data, run.inp)[0]['image']  # uint8, as exported
  for batch in (images[:1], images[:7]):
    want = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       run.augment.eval(batch), train=False)  # --mode=eval's normalised inputs
    np.testing.assert_allclose(exported.call(batch), want, rtol=1e-5, atol=1e-5)
