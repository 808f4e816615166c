"""Restoring the newest good checkpoint: retries, the damage verdict, and the hosts' agreement.

Only a checkpoint whose content is missing or corrupt (checkpoint_damage.py) is
moved aside; a read error, a timeout or memory is retried and then stops the run
with nothing moved. On several hosts each reads on its own and they act on the
worst outcome any of them saw, so no host goes back while another goes on.
"""
from __future__ import annotations

import time
from typing import Any

from absl import logging

from resnet_jax import checkpoint_damage as damage
from resnet_jax import checkpoint_quarantine as quarantine
from resnet_jax import checkpointing
from resnet_jax import errors
from resnet_jax import hosts

# A restore that fails for another reason than the checkpoint's content (a read
# error, a timeout, memory) is tried this often before the run stops.
RESTORE_ATTEMPTS = 3
RETRY_SECONDS = 2.0

_OK, _DAMAGED, _FAILED = 0, 1, 2  # restore outcomes, in the order hosts agree on them


def _agree(outcome: int) -> int:
  """The outcome every host acts on: the worst any host saw (one shared decision)."""
  agreed = hosts.worst(outcome)
  if agreed not in (_OK, _DAMAGED, _FAILED):
    raise RuntimeError(f'The hosts disagree on restoring a checkpoint (got {agreed}).')
  return agreed


def _restore_with_retries(ckpt: checkpointing.Checkpoints, step: int,
                          abstract_state: Any) -> tuple[int, Any]:
  """(outcome, restored or the error): retries errors that are not content damage."""
  for attempt in range(1, RESTORE_ATTEMPTS + 1):
    try:
      return _OK, ckpt.restore(step, abstract_state)
    except damage.DamagedCheckpointError as e:
      return _DAMAGED, e
    except damage.CheckpointAccessError as e:
      return _FAILED, e  # permissions or credentials: retrying will not help
    except errors.CheckpointError:
      raise  # does not fit the model: the config is wrong, nothing is damaged
    except Exception as e:  # pylint: disable=broad-except
      if not damage.transient(e):
        raise  # a bug, not the storage: its traceback matters
      if attempt == RESTORE_ATTEMPTS:
        return _FAILED, e
      logging.warning('Restoring the checkpoint at step %d failed (attempt %d of %d: %s: %s); '
                      'retrying.', step, attempt, RESTORE_ATTEMPTS, type(e).__name__,
                      damage.first_line(str(e)))
      time.sleep(RETRY_SECONDS * 2 ** (attempt - 1))

def latest_good(ckpt: checkpointing.Checkpoints,
                abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
  """The newest checkpoint that can be read (None if there is none).

  Only a checkpoint whose content is missing or corrupt is moved aside, to
  WORKDIR/damaged_checkpoints/ (not deleted), so that training can write that
  step again; the hosts decide together. Any other failure is retried and
  then stops the run with its error, with nothing moved. A checkpoint that
  does not fit the config is an error, not a reason to go back.
  """
  damaged = []
  for step in sorted(ckpt.steps(), reverse=True):
    outcome, result = _restore_with_retries(ckpt, step, abstract_state)
    agreed = _agree(outcome)
    if agreed == _FAILED:
      error = result if outcome == _FAILED else RuntimeError('it failed on another host')
      if isinstance(error, damage.CheckpointAccessError):
        raise error
      how = f'after {RESTORE_ATTEMPTS} attempts'
      raise errors.CheckpointError(
          f'Could not restore the checkpoint at step {step} in {ckpt.directory}: {how} '
          f'({type(error).__name__}: {damage.first_line(str(error))}). Nothing was moved or '
          'deleted: fix the cause (permissions, storage access, memory) and rerun the same '
          'command.') from (result if outcome == _FAILED else None)
    if agreed == _DAMAGED:
      logging.warning('%s', result if outcome == _DAMAGED else
                      f'The checkpoint at step {step} is damaged on another host.')
      ckpt.move_aside(step, str(result) if outcome == _DAMAGED else 'damaged on another host')
      damaged.append(step)
      continue
    if outcome != _OK:
      raise RuntimeError(f'Restoring step {step}: agreed {agreed}, but this host saw {outcome}.')
    if damaged:
      logging.warning('Resuming from step %d: the newer checkpoints %s are damaged and were '
                      'moved to %s.', step, damaged, ckpt.damaged_dir)
    state, loop = result
    return step, state, loop
  if damaged or quarantine.earlier_damage(ckpt.directory):
    earlier = '' if damaged else ' earlier'
    raise errors.CheckpointError(
        f'No usable checkpoint in {ckpt.directory}: every one was found damaged{earlier} and '
        f'moved to {ckpt.damaged_dir} (each with WHY_DAMAGED.txt). Training does not start '
        f'over on its own: to start afresh here, delete {ckpt.damaged_dir}; or use a new '
        'workdir.')
  return None
