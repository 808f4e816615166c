"""WORKDIR/config.json: what a run trains, saved at its start and compared when it resumes.

A resumed run must train what its checkpoints were trained for: a config that changes
that (model, data, batch size, optimizer, schedule, seed) stops and lists the differences,
unless config.allow_resume_changes. Harmless changes (logging, evaluation, more steps, the
loader's workers) go through; every change is recorded in WORKDIR/config_changes.jsonl.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
from absl import logging
from etils import epath

from resnet_jax import checkpointing
from resnet_jax import errors
from resnet_jax import paths


def save_config(config: Any, workdir: epath.Path, cpu_kernels_used: str) -> None:
  """WORKDIR/config.json: the config, and what config.cpu_kernels resolved to here."""
  if jax.process_index() == 0:
    saved = json.loads(config.to_json_best_effort())
    saved['cpu_kernels_used'] = cpu_kernels_used
    paths.write_json(workdir / 'config.json', saved)


# Fields a resumed run may change: they do not change what is trained (the loader's
# processes and buffers, where the data lives, when to log, evaluate and checkpoint, how
# far to train, the eval batch: every eval example counts once whatever it is).
RESUME_HARMLESS = (
    'num_epochs', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'profile', 'cpu_kernels', 'parallel',
    'init_from', 'eval_batch_size', 'allow_resume_changes', 'data.data_dir', 'data.manual_dir',
    'data.workers', 'data.threads', 'data.worker_buffer', 'data.read_buffer', 'data.prefetch',
    'data.final_eval_crop', 'data.multi_scale_sides')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def resume_changes(saved: dict[str, Any], config: Any) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """(changes to what is trained, harmless changes) from the config a workdir was trained
  with (its config.json) to `config`, each field -> (saved, new). Fields only one of them
  has (retired or new ones) are not compared."""
  old = _flatten(saved)
  new = _flatten(json.loads(config.to_json_best_effort()))
  changed = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
  harmful = {k: v for k, v in changed.items() if k not in RESUME_HARMLESS}
  return harmful, {k: v for k, v in changed.items() if k in RESUME_HARMLESS}


def check_resume(config: Any, workdir: epath.Path,
                         ckpt: checkpointing.Checkpoints) -> dict[str, Any] | None:
  """A resumed run trains what its checkpoints were trained for: a config that changes that
  (model, data, batch size, optimizer, schedule, seed) stops with the differences unless
  config.allow_resume_changes. Returns the record of the changes (None: none)."""
  saved_path = workdir / 'config.json'
  if not ckpt.steps() or not saved_path.exists():
    return None
  harmful, harmless = resume_changes(paths.read_json(saved_path), config)
  if harmful and not config.allow_resume_changes:
    listed = '\n  '.join(f'config.{k}: {old!r} -> {new!r}' for k, (old, new) in harmful.items())
    raise errors.ConfigError(
        f'{workdir} was trained with another config; this one changes what is trained:\n  '
        f'{listed}\nRerun with the config it was trained with (see {saved_path}), use a new '
        'workdir, or add --config.allow_resume_changes=True to go on with these changes.')
  changes = {**harmful, **harmless}
  if changes:
    log = logging.warning if harmful else logging.info
    log('Resuming %s with config changes: %s', workdir,
        '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items()))
    return {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'after_step': ckpt.latest_step(),
            'changes': {k: [old, new] for k, (old, new) in changes.items()}}
  return None


def record_changes(workdir: epath.Path, record: dict[str, Any] | None) -> None:
  """WORKDIR/config_changes.jsonl: one line per resume that changed the config."""
  if record and jax.process_index() == 0:
    paths.append_line(workdir / 'config_changes.jsonl', json.dumps(record))
