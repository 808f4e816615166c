"""Quarantine: checkpoints proven damaged go to WORKDIR/damaged_checkpoints/, never deleted.

Each moved checkpoint keeps its files and gets WHY_DAMAGED.txt, so the user
can look and the trainer can write that step again. A step whose eval-metrics
file holds no JSON (a crash while it was written) keeps its state: only the
file is set aside. Once every checkpoint has been moved here, a rerun must not
start over silently (`earlier_damage`). Process 0 moves; callers then sync the
hosts and reload their managers.
"""
from __future__ import annotations

import json
import time

from absl import logging
from etils import epath

from resnet_jax import checkpoint_damage


def damaged_dir(directory: epath.Path) -> epath.Path:
  """Where WORKDIR/checkpoints' damaged steps go."""
  return directory.parent / 'damaged_checkpoints'


def move_aside(directory: epath.Path, step: int, why: str) -> epath.Path:
  """Moves checkpoints/STEP to damaged_checkpoints/STEP-TIME with a note saying why."""
  target_dir = damaged_dir(directory)
  target_dir.mkdir(parents=True, exist_ok=True)
  target = target_dir / f'{step}-{int(time.time())}'
  (directory / str(step)).rename(target)
  (target / 'WHY_DAMAGED.txt').write_text(why + '\n')
  logging.warning('Moved the checkpoint at step %d to %s: %s', step, target, why)
  return target


def earlier_damage(directory: epath.Path) -> bool:
  """Whether checkpoints were moved aside before (and none is left to resume from)."""
  target_dir = damaged_dir(directory)
  return target_dir.exists() and any(target_dir.iterdir())


def set_aside_unreadable_metrics(directory: epath.Path) -> None:
  """Renames each step's eval-metrics file that holds no JSON to metrics.unreadable-TIME
  (orbax's manager fails to start on it): the step still restores, it only loses its say
  in which step is the best. A file that cannot be read at all is an access error."""
  if not directory.exists():
    return
  for step_dir in directory.iterdir():
    path = step_dir / 'metrics' / 'metrics'
    if not step_dir.name.isdigit() or not path.exists():
      continue
    try:
      json.loads(path.read_text())
    except OSError as e:
      raise checkpoint_damage.CheckpointAccessError(step_dir, e) from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      target = path.with_name(f'metrics.unreadable-{int(time.time())}')
      path.rename(target)
      logging.warning('The eval metrics of %s are unreadable (%s): moved to %s; the step '
                      'still restores, but is no longer a candidate for the best checkpoint.',
                      step_dir, checkpoint_damage.first_line(str(e)) or 'empty', target)
