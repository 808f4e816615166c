"""A real multi-host run: 2 processes on 127.0.0.1 with 2 CPU devices each."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from resnet_jax import cli
from resnet_jax import errors
from tests.support import helpers
from tests.test_checkpoints import (SLOW_EVAL, assert_same_state, assert_trees_close, results,
                                    saved_state)

# BN statistics per device (groups of 2), a small learning rate and few steps: the
# 2-process run is compared with 1 process step by step. Its first step agrees with one
# process's to rounding (1e-9 in the parameters); later steps are compared with one
# process resumed from the 2-process checkpoint before them, since the state amplifies
# rounding: 1 process resumed from the 2-process state after step 1 computes step 2 as
# the 2 processes do (1.6e-7 in the momentum), while the 1e-9 difference between the two
# step-1 states becomes 2.4e-3 in step 2's momentum and 0.12 in step 3's (jax 0.10.2 and
# 0.12.1; the digits' BN groups of 8 images have channels of almost no variance).
ARGS = ['--config.num_train_steps=3', '--config.batch_size=16', '--config.eval_batch_size=64',
        '--config.log_every_steps=1', '--config.eval_every_steps=3',
        '--config.checkpoint_every_steps=3', '--config.optimizer.learning_rate=0.01',
        '--config.model.bn_group_size=2']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_hosts(workdir, *args, host_env=({}, {}), prelude=''):
  """run.py as 2 processes on 127.0.0.1 with 2 CPU devices each (logs in files: no pipe fills)."""
  port = _free_port()
  code = (f'{prelude}\nimport runpy, sys\nsys.argv = ["run.py"] + sys.argv[1:]\n'
          f'runpy.run_path({os.path.join(helpers.REPO, "run.py")!r}, run_name="__main__")\n')
  hosts = []
  for i in range(2):
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2', **host_env[i]}
    log = open(f'{workdir}.host{i}.{time.monotonic_ns()}.log', 'w+')  # pylint: disable=consider-using-with
    hosts.append((subprocess.Popen(
        [sys.executable, '-c', code, f'--workdir={workdir}', *args,
         f'--distributed=127.0.0.1:{port},2,{i}'],
        stdout=subprocess.DEVNULL, stderr=log, text=True, env=env, cwd=helpers.REPO), log))
  return hosts


def _finish(hosts, check=True):
  """Each host's log, once both have exited (with 0, if `check`)."""
  logs = []
  for process, log in hosts:
    process.wait(timeout=600)
    log.seek(0)
    logs.append(log.read())
    log.close()
    assert process.returncode == 0 or not check, logs[-1][-4000:]
  return logs


FAIL_RESTORE = """
import os
import orbax.checkpoint as ocp
from resnet_jax import checkpoint_restore
checkpoint_restore.RETRY_SECONDS = 0.01
if os.environ.get('FAIL_RESTORE'):
  def _fail(*args, **kwargs):
    raise ValueError('UNAVAILABLE: reading the bucket timed out (a test)')
  ocp.CheckpointManager.restore = _fail
"""


def test_two_hosts_train_like_one_restore_in_one_and_stop_together_if_a_restore_fails(
    tmp_path, digits_dir):
  data, every_step = f'--config.data.data_dir={digits_dir}', '--config.checkpoint_every_steps=1'
  multi, single, resumed = tmp_path / 'two_hosts', tmp_path / 'one_host', tmp_path / 'resumed'
  logs = _finish(_start_hosts(multi, data, *ARGS, every_step))
  # Each host read its own devices' rows of each global batch, and its own half of the eval split.
  assert ('Host 0 of 2 trains on rows (0, 8) of each global batch of sklearn_digits train and '
          'evaluates on its part 1 of 2 of test') in logs[0]
  assert ('Host 1 of 2 trains on rows (8, 16) of each global batch of sklearn_digits train and '
          'evaluates on its part 2 of 2 of test') in logs[1]

  # Same global batches, same initial state, same first step (1 process x 4 devices: conftest).
  helpers.run_py(f'--workdir={single}', data, *ARGS, every_step)
  assert_trees_close(saved_state(multi, 1)[1], saved_state(single, 1)[1], rtol=1e-5)
  losses = lambda lines: [line['train_loss'] for line in lines if 'train_loss' in line]
  np.testing.assert_allclose(losses(results(multi))[:2], losses(results(single))[:2], rtol=1e-6)
  # The last step and the evaluation after it, from the 2-process state before it.
  shutil.copytree(multi, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '3')
  helpers.run_py(f'--workdir={resumed}', data, *ARGS, every_step)
  step, two = saved_state(multi)
  assert step == 3
  assert_trees_close(two, saved_state(resumed, 3)[1], rtol=1e-5)
  multi_lines, resumed_lines = results(multi), results(resumed)
  np.testing.assert_allclose(losses(multi_lines), losses(resumed_lines), rtol=1e-6)
  evals = lambda lines: [line for line in lines if 'eval_loss' in line]
  assert [line['eval_num_examples'] for line in evals(multi_lines)] == [360]
  for a, b in zip(evals(multi_lines), evals(resumed_lines), strict=True):
    assert np.isclose(a['eval_loss'], b['eval_loss'], rtol=1e-5)

  # The 2-process checkpoint restores in a single process (1 device) for evaluation.
  out = helpers.run_py('--mode=eval', f'--workdir={multi}', env={'XLA_FLAGS': ''})
  result = json.loads(out.stdout[out.stdout.index('{'):])
  final = [line for line in results(multi) if 'eval_top1_error' in line][-1]
  assert result['step'] == 3 and result['num_devices'] == 1
  assert np.isclose(result['top1_error'], final['eval_top1_error'])

  # A restore that fails on one host (a bucket timing out) stops every host; nothing is moved.
  hosts = _start_hosts(multi, data, *ARGS[1:], '--config.num_train_steps=6',
                       prelude=FAIL_RESTORE, host_env=({}, {'FAIL_RESTORE': '1'}))
  logs = _finish(hosts, check=False)
  assert [process.returncode for process, _ in hosts] == [1, 1], logs[1][-3000:]
  for log in logs:
    assert 'Could not restore the checkpoint at step 3' in log and 'Nothing was moved' in log
  assert 'UNAVAILABLE: reading the bucket timed out' in logs[1]
  assert 'it failed on another host' in logs[0]
  assert sorted(os.listdir(multi / 'checkpoints')) == ['1', '2', '3']
  assert not (multi / 'damaged_checkpoints').exists()


def test_the_compilation_cache_is_off_only_where_cached_cpu_collectives_hang():
  """jax 0.12.1's CPU programs loaded from the persistent cache hang in gloo collectives (a
  second 2-process run of the same command never passed its first step); 0.10.2 and 0.11.2
  do not. On such a version the multi-process tests here exercise the guard: their runs
  share the session's compilation cache (conftest)."""
  hang = cli.cached_cpu_collectives_hang
  assert hang((0, 12, 1), 'cpu', '/tmp/cache', True)
  assert hang((0, 13, 0), 'cpu', '/tmp/cache', True)
  assert not hang((0, 11, 2), 'cpu', '/tmp/cache', True)
  assert not hang((0, 10, 2), 'cpu', '/tmp/cache', True)
  assert not hang((0, 12, 1), 'gpu', '/tmp/cache', True)
  assert not hang((0, 12, 1), 'tpu', '/tmp/cache', True)
  assert not hang((0, 12, 1), 'cpu', None, True)
  assert not hang((0, 12, 1), 'cpu', '/tmp/cache', False)


def test_a_malformed_distributed_flag_is_a_config_error_before_joining_anything():
  for spec in ('127.0.0.1:1234', '127.0.0.1:1234,2', '127.0.0.1:1234,two,0'):
    with pytest.raises(errors.ConfigError, match='HOST:PORT,NUM_PROCESSES,PROCESS_ID'):
      cli.init_distributed(spec)


def _preempt(hosts, ready):
  deadline = time.time() + 300
  while not ready():
    assert all(h.poll() is None for h, _ in hosts) and time.time() < deadline
    time.sleep(0.05)
  hosts[1][0].send_signal(signal.SIGTERM)
  logs = _finish(hosts)
  stops = [re.findall(r'SIGTERM: saved a checkpoint at step (\d+)', log) for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, logs[0][-3000:]
  return int(stops[0][0]), logs


def test_sigterm_on_one_host_stops_both_at_one_step_then_they_resume_exactly(tmp_path, digits_dir):
  """JAX's preemption sync manager: host 1 gets SIGTERM, both hosts save the same step, in
  training, then (in the resumed run) in an evaluation, which they stop at the same batch;
  the third run ends exactly where an uninterrupted one does."""
  args = [f'--config.data.data_dir={digits_dir}', *ARGS[1:], '--config.num_train_steps=12',
          '--config.eval_every_steps=6', '--config.checkpoint_every_steps=6']
  straight = tmp_path / 'straight'
  _finish(_start_hosts(straight, *args))

  workdir = tmp_path / 'preempted'
  metrics = workdir / 'metrics.jsonl'
  step, _ = _preempt(_start_hosts(workdir, *args),
                     lambda: metrics.exists() and '"train_loss"' in metrics.read_text())
  assert 1 <= step < 12 and saved_state(workdir)[0] == step

  # Resumed: stopped again in the next evaluation (at step 6, or 12 after a first stop
  # past 6).
  started = tmp_path / 'eval_started'
  hosts = _start_hosts(workdir, *args, prelude=SLOW_EVAL,
                       host_env=({'EVAL_STARTED': str(started)}, {'EVAL_STARTED': '/dev/null'}))
  first_stop, (step, logs) = step, _preempt(hosts, started.exists)
  assert step in (6, 12) and step >= first_stop, (first_stop, step)
  assert all(f'SIGTERM during the evaluation at step {step}' in log for log in logs)

  _finish(_start_hosts(workdir, *args))  # the same command on both hosts continues
  last, resumed = saved_state(workdir)
  _, expected = saved_state(straight)
  assert last == 12
  assert_same_state(resumed, expected)
  assert results(workdir) == results(straight)
