"""The faults users meet, each made on a real run's workdir, and what the next run does.

One table: each fault is injected into a copy of a workdir trained for 18 steps
(checkpoints at 6, 12 and 18), then training is asked to continue to step 24.
Either it recovers (falls back to the newest good checkpoint and ends bitwise
equal to an uninterrupted run) or it stops with one line saying what happened
and what to do, having moved, overwritten or deleted nothing. Runs are
in-process (`train.train_and_evaluate`, what run.py calls) except where the
behaviour needs a process: signals, another user, a second live run.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

import pytest

from configs import default
from resnet_jax import config_lib
from resnet_jax import errors
from tests.support import helpers
from tests.conftest import TRAIN
from tests.test_checkpoints import _start, _wait_for, assert_same_state, results, saved_state


def _config(digits_dir, steps=24, **overrides):
  """run.py's config with the TRAIN flags (what the `straight` fixture trained)."""
  config = default.get_config()
  for flag in TRAIN:
    key, value = flag[len('--config.'):].split('=')
    config_lib.set_field(config, key, int(value))
  overrides = {'data.data_dir': digits_dir, 'num_train_steps': steps, **overrides}
  for key, value in overrides.items():
    config_lib.set_field(config, key, value)
  return config


def _train(workdir, digits_dir, **overrides):
  from resnet_jax import train  # pylint: disable=import-outside-toplevel
  return train.train_and_evaluate(_config(digits_dir, **overrides), str(workdir))


@pytest.fixture(scope='module')
def trained18(tmp_path_factory, digits_dir):
  workdir = tmp_path_factory.mktemp('trained18')
  _train(workdir, digits_dir, steps=18)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '18', '6']
  return workdir


@pytest.fixture(scope='module')
def extended24(tmp_path_factory, trained18, digits_dir):
  """trained18 continued to step 24 with no fault: the run a recovery from step 18 must
  reproduce (its log differs from `straight`'s by the train line at step 18, where it
  ended)."""
  workdir = tmp_path_factory.mktemp('extended') / 'w'
  shutil.copytree(trained18, workdir)
  _train(workdir, digits_dir)
  return workdir


def snapshot(workdir):
  """Every file under `workdir` and a hash of its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_stops_changing_nothing(workdir, digits_dir, error, match, **overrides):
  """Training in `workdir` raises `error` matching `match`, and leaves every file as it was."""
  before = snapshot(workdir)
  with pytest.raises(error, match=match):
    _train(workdir, digits_dir, **overrides)
  assert snapshot(workdir) == before  # nothing moved, overwritten or deleted


def array_files(workdir, step):
  found = [os.path.join(root, name) for root, _, names in
           os.walk(workdir / 'checkpoints' / str(step) / 'state') for name in names
           if os.path.basename(root) == 'd']
  assert found
  return sorted(found, key=os.path.getsize)


def _delete_largest_array_file(workdir):
  os.unlink(array_files(workdir, 18)[-1])


def _garble_array_bytes(workdir):
  """Random bytes inside compressed array data: tensorstore decodes them without an error."""
  path = array_files(workdir, 18)[-1]
  data = bytearray(open(path, 'rb').read())
  middle = len(data) // 2
  data[middle:middle + 256] = bytes((b * 7 + 13) % 256 for b in data[middle:middle + 256])
  open(path, 'wb').write(bytes(data))


def _empty_eval_metrics(workdir):
  (workdir / 'checkpoints' / '18' / 'metrics' / 'metrics').write_text('')


def _torn_metrics_line(workdir):
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 18, "train_lo')


def _stale_lock_of_a_dead_process(workdir):
  """A lock file as a run leaves it when it is killed: its heartbeat is fresh, its pid gone."""
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  now = time.time()
  (workdir / 'LOCK').write_text(json.dumps({
      'host': socket.gethostname(), 'pid': int(dead.stdout), 'purpose': 'train',
      'started': 'recently', 'started_epoch': now - 60, 'heartbeat': 'now',
      'heartbeat_epoch': now, 'token': 'killed'}))


def _damage_every_checkpoint(workdir):
  for step in (6, 12, 18):
    os.unlink(array_files(workdir, step)[-1])


@dataclasses.dataclass(frozen=True)
class Recovers:
  """The run continues from `from_step` and ends as an uninterrupted run would."""
  from_step: int
  moved: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Stops:
  """The run stops at once with a message matching `message`, and changes nothing (but for
  moving damaged checkpoints to damaged_checkpoints/, where `moves_damaged`)."""
  message: str
  moves_damaged: bool = False


FAULTS: list[tuple[str, Callable, dict, object]] = [
    ('an array file of the newest checkpoint deleted', _delete_largest_array_file, {},
     Recovers(12, moved=(18,))),
    ('bytes of an array file garbled (no decoder error)', _garble_array_bytes, {},
     Recovers(12, moved=(18,))),
    ("a checkpoint's eval metrics file left empty by a crash", _empty_eval_metrics, {},
     Recovers(18)),
    ('a torn last line in metrics.jsonl', _torn_metrics_line, {}, Recovers(18)),
    ('the lock file of a run that died', _stale_lock_of_a_dead_process, {}, Recovers(18)),
    ('another checkpoint period and loader setting', lambda w: None,
     {'checkpoint_every_steps': 3, 'data.prefetch': 1}, Recovers(18)),
    ('every checkpoint damaged', _damage_every_checkpoint, {},
     Stops(r'No usable checkpoint in .*every one was found damaged and moved to .*'
           r'damaged_checkpoints.* delete .*damaged_checkpoints; or use a new workdir',
           moves_damaged=True)),
    ('another batch size and learning rate', lambda w: None,
     {'batch_size': 32, 'optimizer.learning_rate': 0.05},
     Stops(r'trained with another config.*\n  config.batch_size: 16 -> 32\n'
           r'  config.optimizer.learning_rate: 0.1 -> 0.05\n.*allow_resume_changes=True')),
    ('a bad config value', lambda w: None, {'log_every_steps': 0, 'keep_checkpoints': 0},
     Stops(r'2 config values cannot work:\n  config.log_every_steps=0 must be at least 1\n'
           r'  config.keep_checkpoints=0 must be at least 1')),
]


@pytest.mark.parametrize('name,inject,overrides,outcome', FAULTS, ids=[f[0] for f in FAULTS])
def test_fault(name, inject, overrides, outcome, trained18, tmp_path, digits_dir, straight,
               request):
  del name
  workdir = tmp_path / 'w'
  shutil.copytree(trained18, workdir)
  inject(workdir)
  before = snapshot(workdir)
  if isinstance(outcome, Stops):
    with pytest.raises(errors.UserError, match=outcome.message):
      _train(workdir, digits_dir, **overrides)
    after = snapshot(workdir)
    if outcome.moves_damaged:  # checkpoints/N/... -> damaged_checkpoints/N-TIME/..., as is
      moved = {k: v for k, v in after.items() if k.startswith('damaged_checkpoints/')}
      after = {k: v for k, v in after.items() if k not in moved}
      assert {'checkpoints/' + k.split('/', 1)[1].split('-', 1)[0] + '/' + k.split('/', 2)[2]: v
              for k, v in moved.items() if not k.endswith('WHY_DAMAGED.txt')} == {
                  k: v for k, v in before.items() if k.startswith('checkpoints/')}
      before = {k: v for k, v in before.items() if not k.startswith('checkpoints/')}
    assert after == before  # nothing (else) moved, overwritten or deleted
    return
  _train(workdir, digits_dir, **overrides)
  step, state = saved_state(workdir)
  _, expected = saved_state(straight)
  assert step == 24
  assert_same_state(state, expected)
  # From 12 the run retrains what `straight` trained; from 18 it continues as trained18 would.
  reference = straight if outcome.from_step == 12 else request.getfixturevalue('extended24')
  assert results(workdir) == results(reference)
  moved = sorted(int(d.split('-')[0]) for d in os.listdir(workdir / 'damaged_checkpoints')) if (
      workdir / 'damaged_checkpoints').exists() else []
  assert moved == list(outcome.moved)
  if 18 not in outcome.moved:  # the intact newest checkpoint is where it was, unchanged
    state_files = lambda files: {k: v for k, v in files.items()
                                 if k.startswith('checkpoints/18/state/')}
    assert state_files(snapshot(workdir)) == state_files(before)
  (record,) = helpers.read_jsonl(workdir / 'config_changes.jsonl')  # 18 -> 24 steps, ...
  assert record['after_step'] == 18  # the newest checkpoint when it was resumed
  assert set(record['changes']) == {'num_train_steps', *overrides}
  assert not (workdir / 'LOCK').exists()  # released at the end


def test_every_checkpoint_damaged_stops_again_on_the_next_run(trained18, tmp_path, digits_dir):
  workdir = tmp_path / 'w'
  shutil.copytree(trained18, workdir)
  _damage_every_checkpoint(workdir)
  with pytest.raises(errors.CheckpointError, match='every one was found damaged and moved'):
    _train(workdir, digits_dir)
  assert_stops_changing_nothing(workdir, digits_dir, errors.CheckpointError,
                                'found damaged earlier')  # does not silently start over


def test_a_torn_line_before_the_last_is_an_error_naming_it(trained18, tmp_path, digits_dir):
  workdir = tmp_path / 'w'
  shutil.copytree(trained18, workdir)
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  lines[2] = lines[2][:10]
  (workdir / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')
  assert_stops_changing_nothing(workdir, digits_dir, errors.UserError,
                                r'metrics.jsonl, line 3, is not a metrics record')


def test_harmless_changes_are_recorded_and_harmful_ones_allowed_on_request(trained18, tmp_path,
                                                                           digits_dir):
  workdir = tmp_path / 'w'
  shutil.copytree(trained18, workdir)
  _train(workdir, digits_dir, steps=20, **{'optimizer.learning_rate': 0.05,
                                           'allow_resume_changes': True})
  records = helpers.read_jsonl(workdir / 'config_changes.jsonl')
  assert records[0]['after_step'] == 18
  assert records[0]['changes'] == {'allow_resume_changes': [False, True],
                                   'num_train_steps': [18, 20],
                                   'optimizer.learning_rate': [0.1, 0.05]}
  assert json.loads((workdir / 'config.json').read_text())['optimizer']['learning_rate'] == 0.05


def test_workdir_that_is_a_file_or_unwritable_stops_before_anything(tmp_path, digits_dir):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  with pytest.raises(errors.ConfigError, match='is a file .* pick another --workdir'):
    _train(afile, digits_dir)
  with pytest.raises(errors.ConfigError, match='is a file .* pick another --workdir'):
    _train(afile / 'sub', digits_dir)
  fresh = tmp_path / 'fresh'
  with pytest.raises(errors.ConfigError, match='batch_size=0 must be at least 1'):
    _train(fresh, digits_dir, batch_size=0)
  assert not fresh.exists()  # checked before anything was written


def test_divergence_before_any_checkpoint_says_so(tmp_path, digits_dir):
  with pytest.raises(errors.DivergedError, match='No checkpoint was saved before it.*starts '
                     'again from step 0'):
    _train(tmp_path / 'w', digits_dir, **{'optimizer.learning_rate': 1e30})


def test_a_second_run_on_a_live_runs_workdir_stops_naming_it(trained18, tmp_path, digits_dir):
  from resnet_jax import workdir_lock  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / 'w'
  shutil.copytree(trained18, workdir)
  with workdir_lock.hold(workdir):  # a live holder: this process
    assert_stops_changing_nothing(
        workdir, digits_dir, errors.WorkdirInUseError,
        rf'in use by another run \(train\): host .*, pid {os.getpid()}, started .* delete .*LOCK')
  assert not (workdir / 'LOCK').exists()


def test_ctrl_c_saves_like_sigterm_and_a_second_signal_does_not_abort_the_save(
    tmp_path, digits_dir, straight):
  """Ctrl-C (SIGINT to the process group, grain's workers too) saves like SIGTERM; in the
  resumed run, a SIGINT 0.3 s after a SIGTERM is logged, not obeyed; the third run ends
  exactly where an uninterrupted one does."""
  args = [f'--config.data.data_dir={digits_dir}', '--config.num_train_steps=24',
          '--config.data.workers=1', *TRAIN]
  workdir = tmp_path / 'stopped'
  metrics = workdir / 'metrics.jsonl'
  stopped_at = 0
  for signals in (('SIGINT',), ('SIGTERM', 'SIGINT')):
    process = _start(workdir, args, start_new_session=True)
    # Training has gone on past the last stop (each step is logged in metrics.jsonl).
    _wait_for(process, lambda: metrics.exists() and any(
        '"train_loss"' in line and json.loads(line)['step'] > stopped_at
        for line in metrics.read_text().splitlines()))
    os.killpg(process.pid, getattr(signal, signals[0]))
    if len(signals) > 1:
      subprocess.run(['sleep', '0.3'], check=True)
      os.killpg(process.pid, getattr(signal, signals[1]))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    first = 'Ctrl-C' if signals[0] == 'SIGINT' else 'SIGTERM'
    assert f'{first}: saved a checkpoint at step' in stderr, stderr[-3000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
    step, _ = saved_state(workdir)
    assert stopped_at < step < 24, (stopped_at, step)
    stopped_at = step
  helpers.run_py(f'--workdir={workdir}', *args)
  step, state = saved_state(workdir)
  assert step == 24
  assert_same_state(state, saved_state(straight)[1])
  assert results(workdir) == results(straight)


def test_unreadable_checkpoint_is_not_damage(trained18, tmp_path, digits_dir):
  """Permissions (as a user without root's override) stop the run; nothing is moved."""
  nobody = 65534
  if os.geteuid() != 0 and os.geteuid() == nobody:
    pytest.skip('runs as root, to test as another user')
  if os.geteuid() == 0:
    try:
      subprocess.run([sys.executable, '-c', 'pass'], user=nobody, check=True,
                     capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
      pytest.skip(f'this Python ({sys.executable}) cannot run as uid {nobody}: {e} (the '
                  'in-process test below covers the same path)')
  shared = tmp_path / 'shared'
  shutil.copytree(trained18, shared / 'w')
  shutil.copytree(digits_dir, shared / 'tfds')
  for root, dirs, files in os.walk(tmp_path):
    for name in dirs + files:
      os.chmod(os.path.join(root, name), 0o777)
  os.chmod(tmp_path, 0o777)
  parent = tmp_path
  while parent != parent.parent:  # the path to it must be searchable
    parent = parent.parent
    os.chmod(parent, os.stat(parent).st_mode | 0o001)
  state_dir = shared / 'w' / 'checkpoints' / '18' / 'state'
  os.chmod(state_dir, 0)
  before = sorted(os.listdir(shared / 'w' / 'checkpoints'))
  out = subprocess.run(
      [sys.executable, os.path.join(helpers.REPO, 'run.py'), f'--workdir={shared / "w"}',
       f'--config.data.data_dir={shared / "tfds"}', '--config.num_train_steps=24', *TRAIN],
      user=nobody if os.geteuid() == 0 else None, capture_output=True, text=True,
      cwd=helpers.REPO, env={**os.environ, 'HOME': str(shared)}, check=False, timeout=300)
  os.chmod(state_dir, 0o777)
  assert out.returncode == 1, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(
      f'error: The checkpoint {shared / "w" / "checkpoints" / "18"} cannot be read: access was '
      f'denied (Permission denied: {state_dir}). Nothing was moved or deleted'), out.stderr[-2000:]
  assert sorted(os.listdir(shared / 'w' / 'checkpoints')) == before
  assert not (shared / 'w' / 'damaged_checkpoints').exists()


def test_a_full_disk_names_the_failed_save_and_keeps_the_previous_checkpoint(tmp_path,
                                                                            digits_dir):
  """A 3 MB tmpfs holds one checkpoint: the second save fails asynchronously; the run stops
  with one line naming it, and the first checkpoint still restores."""
  full = tmp_path / 'full'
  full.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(full)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode != 0:
    pytest.skip(f'cannot mount a small tmpfs here: {mounted.stderr.strip()}')
  try:
    workdir = full / 'w'
    with pytest.raises(errors.CheckpointError) as raised:
      _train(workdir, digits_dir)
    message = str(raised.value)
    assert '\n' not in message
    # Which of orbax's writers fails first varies: tensorstore's (RESOURCE_EXHAUSTED) or a
    # Python one (ENOSPC); both are named as the full disk they are.
    assert re.match(re.escape(f'Saving the checkpoint at step 12 in {workdir}/checkpoints failed '
                              '(no space left on the disk?): ') +
                    r'(ValueError: RESOURCE_EXHAUSTED: |OSError: \[Errno 28\] No space left)',
                    message), message
    assert message.endswith('The previous checkpoint (step 6) is intact: free space (or fix '
                            'the storage) and rerun the same command to continue from it.')
    step, _ = saved_state(workdir, 6)
    assert step == 6
  finally:
    subprocess.run(['umount', '--lazy', str(full)], check=False)  # (busy: orbax's threads)


def test_a_checkpoint_this_user_may_not_read_stops_and_moves_nothing(trained18, tmp_path,
                                                                    digits_dir, monkeypatch):
  """The same fault in-process (runs as root too): os.access says no, as for another user
  after `chmod 000 checkpoints/18/state`."""
  workdir = tmp_path / 'w'
  shutil.copytree(trained18, workdir)
  state_dir = str(workdir / 'checkpoints' / '18' / 'state')
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda path, mode, **kw: False if os.fspath(path) == (
      state_dir) else real_access(path, mode, **kw))
  assert_stops_changing_nothing(
      workdir, digits_dir, errors.CheckpointError,
      rf'checkpoints/18 cannot be read: access was denied \(Permission denied: {state_dir}\). '
      'Nothing was moved or deleted')
