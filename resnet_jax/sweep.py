"""Sweeps: one base config, a list of overrides, one workdir per member.

A sweep file is a config file with a second function:

    def get_config():  ...           # the base config, as in any config file
    def get_sweep():                 # one dict of overrides per member ...
      return [{'model.name': name} for name in ('plain20', 'resnet20')]
    def get_sweep():                 # ... or named members
      return {'r110': {'model.name': 'resnet110', 'schedule.warmup_lr': 0.01}}

`python run.py --mode=sweep --config=configs/sweeps/X.py --workdir=DIR` trains
the members one after another in DIR/<member>/ (command-line overrides apply to
every member), skips members that already finished, resumes one that was
interrupted, and writes DIR/summary.md and DIR/summary.csv.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import traceback
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from resnet_jax import errors
from resnet_jax import hosts
from resnet_jax import paths
from resnet_jax import run_log
from resnet_jax import workdir_lock
from resnet_jax import config_lib


def load_sweep(config_path: str) -> dict[str, dict[str, Any]]:
  """{member name: overrides} from the sweep file's get_sweep()."""
  path = config_path.split(':', 1)[0]
  spec = importlib.util.spec_from_file_location('resnet_jax_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise errors.ConfigError(f'{path} has no get_sweep(): --mode=sweep needs a sweep file '
                     '(see configs/sweeps/).')
  members = module.get_sweep()
  if not isinstance(members, dict):
    members = {member_name(overrides): overrides for overrides in members}
  if not members:
    raise errors.ConfigError(f'{path}: get_sweep() returned no members.')
  return members


def member_name(overrides: dict[str, Any]) -> str:
  """'resnet56' for {'model.name': 'resnet56'}; 'name=resnet56,seed=1' for more keys."""
  if len(overrides) == 1:
    return str(next(iter(overrides.values())))
  return ','.join(f'{k.split(".")[-1]}={v}' for k, v in overrides.items())


def member_config(base: ml_collections.ConfigDict, overrides: dict[str, Any]
                  ) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  config.unlock()
  for key, value in overrides.items():
    try:
      config_lib.set_field(config, key, value)
    except ValueError as e:
      raise errors.ConfigError(f'Sweep override {e}') from None
  return config.lock()


def read_metrics(workdir: str | epath.Path) -> list[dict[str, Any]]:
  path = paths.workdir_path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return run_log.read_metrics(path)  # (a member still running may have a torn last line)


# Training errors whose first crossing measures how fast a net converges.
CONVERGENCE_THRESHOLDS = (0.5, 0.25, 0.15)


def final_results(workdir: str | epath.Path) -> dict[str, Any]:
  """The last training and eval figures of one run (None where absent), and the first
  logged step at which the running training error fell below each threshold."""
  lines = read_metrics(workdir)
  train = [l for l in lines if 'train_top1_error' in l]
  evals = [l for l in lines if 'eval_top1_error' in l]
  return {
      'steps': max((l['step'] for l in lines), default=0),
      'train_error': train[-1]['train_top1_error'] if train else None,
      'test_error': evals[-1]['eval_top1_error'] if evals else None,
      'best_test_error': min(l['eval_top1_error'] for l in evals) if evals else None,
      **{f'steps_to_{round(100 * t)}': next(
          (l['step'] for l in train if l['train_top1_error'] < t), None)
         for t in CONVERGENCE_THRESHOLDS},
  }


# Markers in a member's directory: it finished, or failed (the last line of its error); and
# the lock a process holds while it checks them, trains the member and writes them.
DONE, FAILED, CLAIM = 'DONE', 'FAILED', 'CLAIM'


def _done(name: str, member_dir: epath.Path) -> bool:
  """Whether the member finished or failed earlier (then logged as skipped); every host of
  this run decides alike (another job may be writing DONE meanwhile)."""
  status = member_status(member_dir)
  if not hosts.any_host(status in ('finished', 'failed')):
    return False
  logging.info('Sweep member %s: %s earlier; skipped%s.', name, status,
               f' (delete {member_dir / FAILED} to retry it)' if status == 'failed' else '')
  return True


def member_status(member_dir: epath.Path) -> str:
  """finished, failed, running (another process holds its lock), unfinished or pending."""
  if (member_dir / DONE).exists():
    return 'finished'
  if (member_dir / FAILED).exists():
    return 'failed'
  if member_dir.is_dir() and workdir_lock.live_holder(member_dir, CLAIM) is not None:
    return 'running'
  return 'unfinished' if (member_dir / 'metrics.jsonl').exists() else 'pending'


def run_sweep(base: ml_collections.ConfigDict, config_path: str, workdir: str) -> list[dict]:
  """Trains every member not finished, failed or being trained elsewhere, and writes the
  summary of all of them.

  Several processes or machines may run the same sweep command on one directory: a
  process claims a member (its CLAIM lock) to check its DONE and FAILED markers, train it
  and mark it, so each member is trained by one of them and the others move on (a member
  trained elsewhere shows as running in their summaries; the last process to finish
  writes the complete one). A failed member is not retried until its FAILED file is
  deleted.
  """
  from resnet_jax import train  # pylint: disable=g-import-not-at-top
  workdir = paths.workdir_path(workdir)
  paths.make_workdir(workdir)
  members = load_sweep(config_path)
  configs = {name: member_config(base, overrides) for name, overrides in members.items()}
  primary = jax.process_index() == 0
  for name, overrides in members.items():
    member_dir = workdir / name
    if _done(name, member_dir):
      continue
    try:
      with hosts.claim(member_dir, CLAIM, purpose='sweep member'):
        if _done(name, member_dir):  # (by another process meanwhile)
          continue
        logging.info('Sweep member %s: %s', name, overrides)
        try:
          train.train_and_evaluate(configs[name], str(member_dir))
          if primary:
            (member_dir / DONE).write_text('')
        except (train.Preempted, errors.WorkdirInUseError):
          raise  # SIGTERM stops the whole sweep (a rerun resumes this member); in use: below
        except Exception as e:  # pylint: disable=broad-except  (one failure must not stop it)
          logging.error('Sweep member %s failed:\n%s', name, traceback.format_exc())
          if primary:
            (member_dir / FAILED).write_text(f'{type(e).__name__}: {e}'.splitlines()[0] + '\n')
    except errors.WorkdirInUseError as e:  # another process trains it
      logging.info('Sweep member %s: %s', name, e)
      continue
    finally:
      if primary:
        write_summary(workdir, summary_rows(workdir, configs))
  rows = summary_rows(workdir, configs)
  if primary:
    write_summary(workdir, rows)
  return rows


def summary_rows(workdir: epath.Path, configs: dict[str, Any]) -> list[dict[str, Any]]:
  """Every member's status and figures, as found on disk (whoever trained it)."""
  return [{'member': name, 'model': config.model.name, 'status': member_status(workdir / name),
           **final_results(workdir / name)} for name, config in configs.items()]


def summary_path(workdir: str | epath.Path, kind: str) -> epath.Path:
  return paths.workdir_path(workdir) / f'summary.{kind}'


def write_summary(workdir: str | epath.Path, rows: list[dict[str, Any]]) -> None:
  """DIR/summary.csv and DIR/summary.md: each member's final train and test error and the
  steps it took to reach the convergence thresholds, then each model's mean and spread
  over its members (seeds)."""
  steps_to = [f'steps_to_{round(100 * t)}' for t in CONVERGENCE_THRESHOLDS]
  fields = ['member', 'model', 'status', 'steps', 'train_error', 'test_error',
            'best_test_error', *steps_to]
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=fields, lineterminator='\n', extrasaction='ignore')
  writer.writeheader()
  writer.writerows(rows)
  summary_path(workdir, 'csv').write_text(table.getvalue())
  pct = lambda v: '-' if v is None else f'{100 * v:.2f}%'
  reach = ' | '.join(f'steps to {round(100 * t)}% train error' for t in CONVERGENCE_THRESHOLDS)
  lines = [f'| member | status | steps | train error | test error | best test error | {reach} |',
           '|---|---|---|---|---|---|' + '---|' * len(steps_to)]
  for r in rows:
    lines.append(f'| {r["member"]} | {r["status"]} | {r["steps"]} | {pct(r["train_error"])} | '
                 f'{pct(r["test_error"])} | {pct(r["best_test_error"])} | '
                 + ' | '.join('-' if r.get(k) is None else str(r[k]) for k in steps_to) + ' |')
  models = sorted({r['model'] for r in rows})
  if any(sum(r['model'] == m for r in rows) > 1 for m in models):
    lines += ['', '| model | finished members | final train error (mean +- half range) | '
              'final test error (mean +- half range) |', '|---|---|---|---|']
    for model in models:
      mine = [r for r in rows if r['model'] == model and r['status'] == 'finished'
              and r['test_error'] is not None]
      spread = lambda key: (f'{100 * np.mean([r[key] for r in mine]):.2f}% +- '
                            f'{100 * np.ptp([r[key] for r in mine]) / 2:.2f}%')
      if mine:
        lines.append(f'| {model} | {len(mine)} | {spread("train_error")} | '
                     f'{spread("test_error")} |')
  summary_path(workdir, 'md').write_text('\n'.join(lines) + '\n')
