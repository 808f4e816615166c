"""checkpoint_restore.latest_good on a real workdir: what is retried, what is damage."""
import os

import jax
import orbax.checkpoint as ocp
import pytest

from tests.support import helpers
from tests.test_checkpoints import _copy


def _checkpoints_and_target(workdir, digits_dir):
  """The workdir's Checkpoints and the abstract state of the config it was trained with."""
  from resnet_jax import checkpointing, train
  config = helpers.small_config(**{'data.data_dir': digits_dir, 'batch_size': 16,
                                   'eval_batch_size': 64})
  strategy = train.setup(config).strategy
  return checkpointing.Checkpoints(workdir), strategy.abstract_state(jax.random.key(0))


def test_restore_errors_that_are_not_damage_are_retried_and_move_nothing(
    trained, tmp_path, digits_dir, monkeypatch):
  from resnet_jax import checkpoint_restore, checkpointing
  workdir = _copy(trained, tmp_path)
  monkeypatch.setattr(checkpoint_restore, 'RETRY_SECONDS', 0.01)
  ckpt, target = _checkpoints_and_target(workdir, digits_dir)
  real_restore, calls = ocp.CheckpointManager.restore, []

  def flaky(failures, error):
    def restore(self, *args, **kwargs):
      calls.append(args[0])
      if len(calls) <= failures:
        raise error
      return real_restore(self, *args, **kwargs)
    return restore

  # A read that keeps failing (a storage outage): three attempts, then a clear stop.
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', flaky(
      99, ValueError('UNAVAILABLE: Error reading: connection reset by peer')))
  with pytest.raises(checkpointing.CheckpointError,
                     match='step 12 .* after 3 attempts .*UNAVAILABLE.* Nothing was moved'):
    checkpoint_restore.latest_good(ckpt, target)
  assert calls == [12, 12, 12]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '6']
  assert not (workdir / 'damaged_checkpoints').exists()
  # Out of memory is not damage either.
  calls.clear()
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', flaky(99, MemoryError()))
  with pytest.raises(checkpointing.CheckpointError, match='MemoryError'):
    checkpoint_restore.latest_good(ckpt, target)
  # A transient failure that clears up: the newest checkpoint is restored.
  calls.clear()
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', flaky(2, TimeoutError('read timed out')))
  step, _, _ = checkpoint_restore.latest_good(ckpt, target)
  assert step == 12 and calls == [12, 12, 12]
  ckpt.close()


@pytest.mark.parametrize('damage', ['truncated', 'garbled', 'missing'])
def test_corrupt_checkpoint_content_is_moved_aside_with_the_reason(trained, tmp_path, digits_dir,
                                                                   damage):
  from resnet_jax import checkpoint_restore
  workdir = _copy(trained, tmp_path)
  data_files = list((workdir / 'checkpoints' / '12' / 'state' / 'd').iterdir())
  assert data_files
  for path in data_files:
    content = path.read_bytes()
    if damage == 'truncated':
      path.write_bytes(content[:len(content) // 2])
    elif damage == 'garbled':
      path.write_bytes(content[:16] + bytes(b ^ 0xFF for b in content[16:48]) + content[48:])
    else:
      path.unlink()
  ckpt, target = _checkpoints_and_target(workdir, digits_dir)
  step, _, _ = checkpoint_restore.latest_good(ckpt, target)
  ckpt.close()
  assert step == 6
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['6']
  (moved,) = os.listdir(workdir / 'damaged_checkpoints')
  assert moved.startswith('12-')
  why = (workdir / 'damaged_checkpoints' / moved / 'WHY_DAMAGED.txt').read_text()
  assert 'checkpoints/12 cannot be read' in why and 'state/d/' in why, why
