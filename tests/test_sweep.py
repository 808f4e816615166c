"""Sweeps and the report: members in their own workdirs, resumable, summary and figures."""
import json
import os

import pytest

from tests import helpers

SWEEP = '''
from configs import default

def get_config():
  c = default.get_config()
  c.batch_size, c.eval_batch_size, c.num_train_steps = 16, 72, 4
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
  c.schedule.name = 'constant'
  return c

def get_sweep():
  return [{'model.name': 'plain20'}, {'model.name': 'resnet20'}]
'''


def test_sweep_then_report(tmp_path, digits_dir):
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP)
  workdir = tmp_path / 'sweep'
  args = ['--mode=sweep', f'--config={sweep_file}', f'--workdir={workdir}',
          f'--config.data.data_dir={digits_dir}']
  out = helpers.run_py(*args)
  assert '| plain20 | finished | 4 |' in out.stdout and '| resnet20 | finished | 4 |' in out.stdout
  for member in ('plain20', 'resnet20'):
    with open(workdir / member / 'config.json') as f:
      assert json.load(f)['model']['name'] == member
    assert sorted(os.listdir(workdir / member / 'checkpoints')) == ['2', '4']
  with open(workdir / 'summary.csv') as f:
    rows = f.read().splitlines()
  assert rows[0] == 'member,model,status,steps,train_error,test_error,best_test_error'
  assert [r.split(',')[0] for r in rows[1:]] == ['plain20', 'resnet20']
  summary = (workdir / 'summary.md').read_text()

  # Rerunning skips the finished members and changes nothing.
  before = {m: (workdir / m / 'metrics.jsonl').read_text() for m in ('plain20', 'resnet20')}
  out = helpers.run_py(*args)
  assert out.stderr.count('is already trained for 4 steps') == 2
  assert {m: (workdir / m / 'metrics.jsonl').read_text() for m in before} == before
  assert (workdir / 'summary.md').read_text() == summary

  out = helpers.run_py('--mode=report', f'--workdir={workdir}')
  for name in ('curves.png', 'layer_responses.png', 'summary.md', 'summary.csv'):
    assert (workdir / name).stat().st_size > 0
    assert (workdir / name).read_bytes()[:4] == b'\x89PNG' or not name.endswith('.png')
  with open(workdir / 'layer_responses.json') as f:
    responses = json.load(f)
  # The stem and the 18 3x3 convs of the blocks: 19 responses for a 20-layer net.
  assert sorted(responses) == ['plain20', 'resnet20']
  assert all(len(stds) == 19 and min(stds) > 0 for stds in responses.values())
  assert (workdir / 'summary.md').read_text() == summary


def test_a_preempted_sweep_stops_and_a_failed_member_does_not(tmp_path, monkeypatch):
  from configs import default
  from resnet_jax import sweep, train
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(SWEEP.replace("'resnet20'}]", "'resnet20'}, {'model.name': 'resnet32'}]"))
  calls = []

  def fake_train(config, workdir):
    calls.append(config.model.name)
    if config.model.name == 'plain20':
      raise RuntimeError('diverged')
    if config.model.name == 'resnet20':
      raise train.Preempted('SIGTERM')
    return {}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  with pytest.raises(train.Preempted):
    sweep.run_sweep(default.get_config(), str(sweep_file), str(tmp_path / 'out'))
  assert calls == ['plain20', 'resnet20']  # went on after the failure, stopped at SIGTERM
  summary = (tmp_path / 'out' / 'summary.md').read_text()
  assert '| plain20 | failed |' in summary and 'resnet32' not in summary
