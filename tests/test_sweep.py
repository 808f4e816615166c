"""Sweeps and the report: members in their own workdirs, resumable, summary and figures."""
import json
import os

import numpy as np

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
  assert rows[0] == ('member,model,status,steps,train_error,test_error,best_test_error,'
                     'steps_to_50,steps_to_25,steps_to_15')
  assert [r.split(',')[0] for r in rows[1:]] == ['plain20', 'resnet20']
  summary = (workdir / 'summary.md').read_text()

  # Rerunning skips the finished members and changes nothing.
  before = {m: (workdir / m / 'metrics.jsonl').read_text() for m in ('plain20', 'resnet20')}
  out = helpers.run_py(*args)
  assert out.stderr.count('is already trained for 4 steps') == 2
  assert {m: (workdir / m / 'metrics.jsonl').read_text() for m in before} == before
  assert (workdir / 'summary.md').read_text() == summary

  out = helpers.run_py('--mode=report', f'--workdir={workdir}')
  for name in ('curves.png', 'layer_responses.png', 'layer_gradients.png', 'summary.md',
               'summary.csv'):
    assert (workdir / name).stat().st_size > 0
    assert (workdir / name).read_bytes()[:4] == b'\x89PNG' or not name.endswith('.png')
  with open(workdir / 'layer_analysis.json') as f:
    analyses = json.load(f)
  # The stem and the 18 3x3 convs of the blocks: 19 layers for a 20-layer net, each with its
  # responses (eval and train mode) and gradient norms, at initialisation and at the end.
  assert sorted(analyses) == ['plain20', 'resnet20']
  for result in analyses.values():
    for when in ('init', 'final'):
      figures = result[when]
      assert figures['layers'][:2] == ['stem_bn', 'stage1_block1/bn1']
      for key in ('response_std_eval', 'response_std_train', 'output_gradient_norm',
                  'kernel_gradient_norm'):
        assert len(figures[key]) == 19 and min(figures[key]) > 0, key
      # Train mode normalises with the batch's own statistics: std about the BN scale, 1
      # at initialisation.
      if when == 'init':
        np.testing.assert_allclose(figures['response_std_train'], 1.0, atol=0.02)
    assert result['init']['output_gradient_norm'] != result['final']['output_gradient_norm']
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
