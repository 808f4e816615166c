"""Sweeps and the report: members in their own workdirs, resumable, summary and figures."""
import importlib
import json
import os

import numpy as np

import pytest

from resnet_jax import models
from resnet_jax import config_checks
from resnet_jax import optim
from resnet_jax import sweep
from tests.support import helpers

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


def test_a_preempted_sweep_stops_and_a_failed_member_does_not(tmp_path, monkeypatch):
  from configs import default
  from resnet_jax import train
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
  assert '| plain20 | failed |' in summary and '| resnet32 | pending |' in summary
  assert (tmp_path / 'out' / 'plain20' / 'FAILED').read_text() == 'RuntimeError: diverged\n'
  # A rerun goes on with the preempted member and the rest, not the failed one.
  calls.clear()
  monkeypatch.setattr(train, 'train_and_evaluate', lambda config, workdir: calls.append(
      config.model.name) or {})
  sweep.run_sweep(default.get_config(), str(sweep_file), str(tmp_path / 'out'))
  assert calls == ['resnet20', 'resnet32']


@pytest.mark.parametrize('name,first,count', [
    ('resnet18', 'stage1_block1/bn1', 16),  # not the 7x7 stem
    # ResNet-50's bottleneck blocks, one per stage (at a tenth of ResNet-50's compile):
    ('bottleneck', 'stage1_block1/bn2', 4),  # only each bottleneck's 3x3 conv
])
def test_layer_analysis_covers_the_3x3_layers_only(name, first, count):
  from resnet_jax import analysis  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if name == 'bottleneck':
    model = models.ResNet(stage_sizes=(1, 1, 1, 1), widths=models.IMAGENET_WIDTHS,
                          block_cls=models.BottleneckBlock, stem='imagenet', num_classes=5)
  else:
    model = models.create_model(name, 5)
  images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  figures = analysis.analyse(model, variables, images, np.arange(4) % 5)
  assert figures['layers'][0] == first and len(figures['layers']) == count
  assert all(len(v) == count for v in figures.values())


def test_summary_spreads_finished_seeds_of_each_model(tmp_path):
  row = lambda member, model, status, train, test: {
      'member': member, 'model': model, 'status': status, 'steps': 10, 'train_error': train,
      'test_error': test, 'best_test_error': test}
  sweep.write_summary(tmp_path, [
      row('resnet20-seed0', 'resnet20', 'finished', 0.10, 0.12),
      row('resnet20-seed1', 'resnet20', 'finished', 0.12, 0.13),
      row('resnet20-seed2', 'resnet20', 'unfinished', 0.50, 0.50),  # not in the spread
      row('plain20-seed0', 'plain20', 'finished', 0.2, 0.21)])
  lines = (tmp_path / 'summary.md').read_text().splitlines()
  assert '| resnet20 | 2 | 11.00% +- 1.00% | 12.50% +- 0.50% |' in lines
  assert '| plain20 | 1 | 20.00% +- 0.00% | 21.00% +- 0.00% |' in lines


@pytest.mark.parametrize('name', ['cifar10_depth', 'fashion_mnist_depth', 'fashion_mnist_depth_long'])
def test_shipped_sweeps_resolve_to_valid_members(name):
  """A bad field or model name in a sweep file must fail here, not hours into the sweep."""
  path = os.path.join(helpers.REPO, 'configs', 'sweeps', f'{name}.py')
  base = importlib.import_module(f'configs.sweeps.{name}').get_config()
  members = sweep.load_sweep(path)
  assert len(members) >= 4
  for overrides in members.values():
    config = sweep.member_config(base, overrides)
    assert config.model.name in models.MODEL_NAMES
    models.create_model_from_config(config.model, 10)  # raises on a bad model option
    assert not config_checks.problems(config, num_devices=8)
  if name == 'fashion_mnist_depth_long':
    # The issue asks for the spread over two seeds of the 20- and 56-layer ResNets.
    seeds = {(o['model.name'], o['seed']) for o in members.values()}
    assert {('resnet20', 0), ('resnet20', 1), ('resnet56', 0), ('resnet56', 1)} <= seeds
    config = sweep.member_config(base, members['resnet56-seed1'])
    assert config.num_epochs == 15.0
    lr = optim.schedule_fn(config.schedule, config.optimizer.learning_rate, 468, 7020)
    # Divided by 10 at 50% and 75% of training, as the paper's CIFAR schedule.
    assert [float(lr(s)) for s in (0, 3509, 3510, 5264, 5265)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001])


# A third member with its own seed: three members for two processes, two compiled nets.
THREE_MEMBERS = SWEEP.replace(
    "return [{'model.name': 'plain20'}, {'model.name': 'resnet20'}]",
    "return {'plain20': {'model.name': 'plain20'}, 'resnet20': {'model.name': 'resnet20'},\n"
    "          'resnet20-seed1': {'model.name': 'resnet20', 'seed': 1}}")
MEMBERS = {'plain20': ('plain20', 0), 'resnet20': ('resnet20', 0),  # (model, seed)
           'resnet20-seed1': ('resnet20', 1)}


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_two_processes_share_one_sweep_then_a_rerun_skips_it_and_report_draws_it(
    where, request, tmp_path, digits_dir, empty_cwd):
  """The same sweep command started twice at once: the members are claimed through their
  workdirs' locks, each is trained by exactly one process, and both summaries end complete
  (the last to finish writes after every member is done). Rerunning it skips the finished
  members and changes nothing; --mode=report draws the curves and the layer analysis.
  On gs://, nothing lands on the local disk."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  env = {}
  if where == 'gs':
    env = request.getfixturevalue('gcs_env').env
    workdir = 'gs://bucket/shared_sweep'
  else:
    workdir = str(tmp_path / 'sweep')
  path = lambda name: epath.Path(workdir) / name
  sweep_file = tmp_path / 'sweep3.py'
  sweep_file.write_text(THREE_MEMBERS)
  args = ['--mode=sweep', f'--config={sweep_file}', f'--workdir={workdir}',
          f'--config.data.data_dir={digits_dir}']
  code = ('import runpy, sys\nsys.argv = ["run.py"] + %r\n'
          'runpy.run_path(%r, run_name="__main__")\n' % (args, os.path.join(helpers.REPO,
                                                                            'run.py')))
  processes = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=helpers.REPO,
                                env={**os.environ, **env}) for _ in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  stderr = ''.join(err for _, err in outputs)
  for member in MEMBERS:
    # Trained once: one process's lines, none resumed or re-ran it.
    lines = helpers.read_jsonl(path(f'{member}/metrics.jsonl'))
    assert [line['step'] for line in lines if 'train_loss' in line] == [2, 4], member
    assert path(f'{member}/DONE').exists()
    config = json.loads(path(f'{member}/config.json').read_text())
    assert (config['model']['name'], config['seed']) == MEMBERS[member]
    assert sorted(p.name for p in path(f'{member}/checkpoints').iterdir()) == ['2', '4']
  assert 'is already trained' not in stderr and 'Resuming from' not in stderr, stderr[-3000:]
  assert stderr.count('is in use by another run') >= 1  # they met at least once
  summary = path('summary.md').read_text()
  for member in MEMBERS:
    assert f'| {member} | finished | 4 |' in summary, summary
  rows = path('summary.csv').read_text().splitlines()
  assert rows[0] == ('member,model,status,steps,train_error,test_error,best_test_error,'
                     'steps_to_50,steps_to_25,steps_to_15')
  assert [r.split(',')[0] for r in rows[1:]] == list(MEMBERS)

  # Rerunning skips the finished members and changes nothing.
  before = {m: path(f'{m}/metrics.jsonl').read_text() for m in MEMBERS}
  out = helpers.run_py(*args)
  assert out.stderr.count('finished earlier; skipped') == 3
  assert {m: path(f'{m}/metrics.jsonl').read_text() for m in MEMBERS} == before
  assert path('summary.md').read_text() == summary

  helpers.run_py('--mode=report', f'--workdir={workdir}')
  for name in ('curves.png', 'layer_responses.png', 'layer_gradients.png'):
    assert path(name).read_bytes()[:4] == b'\x89PNG'
  analyses = json.loads(path('layer_analysis.json').read_text())
  # The stem and the 3x3 convs of the blocks (19 layers for a 20-layer net), each with its
  # responses (eval and train mode) and gradient norms, at initialisation and at the end.
  assert sorted(analyses) == sorted(MEMBERS)
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
  assert path('summary.md').read_text() == summary
  assert helpers.nothing_written_locally(empty_cwd)
