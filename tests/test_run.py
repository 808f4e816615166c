"""End to end through run.py, as a user runs it."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.support import helpers

FEW_STEPS = ['--config.num_train_steps=4', '--config.batch_size=16', '--config.eval_batch_size=24',
             '--config.log_every_steps=2', '--config.eval_every_steps=2',
             '--config.checkpoint_every_steps=2']

TRAIN_KEYS = {'step', 'train_loss', 'train_top1_error', 'train_top5_error', 'learning_rate'}
EVAL_KEYS = {'step', 'eval_loss', 'eval_top1_error', 'eval_top5_error', 'eval_num_examples'}


def check_workdir(workdir, steps, num_eval):
  lines = helpers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert all(isinstance(line['step'], int) for line in lines)
  train = [line for line in lines if 'train_loss' in line]
  evals = [line for line in lines if 'eval_loss' in line]
  assert [line['step'] for line in train] == list(range(2, steps + 1, 2))
  assert [line['step'] for line in evals] == list(range(2, steps + 1, 2))
  for line in train:
    assert TRAIN_KEYS <= set(line)
    assert 0 <= line['train_top1_error'] <= 1 and line['train_loss'] > 0
  for line in evals:
    assert EVAL_KEYS <= set(line)
    assert 0 <= line['eval_top5_error'] <= line['eval_top1_error'] <= 1
    assert line['eval_num_examples'] == num_eval  # every example exactly once
  assert any('steps_per_sec' in line for line in lines)
  assert [line['step'] for line in lines if 'images_per_sec' in line] == list(range(2, steps + 1, 2))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  assert sorted(map(int, os.listdir(os.path.join(workdir, 'checkpoints')))) == list(
      range(2, steps + 1, 2))[-3:]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_train_steps'] == steps


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_quickstart_few_steps(tmp_path, digits_dir, mode):
  helpers.run_py(f'--workdir={tmp_path}', f'--config.data.data_dir={digits_dir}',
                 f'--config.parallel={mode}', *FEW_STEPS)
  check_workdir(tmp_path, 4, 360)


def test_cifar10_paper_config_on_digits(tmp_path, digits_dir):
  # The CIFAR recipe (pad, crop and flip, BN groups) on a fixed-size PNG data set.
  helpers.run_py('--config=configs/cifar10.py:resnet20', f'--workdir={tmp_path}', *FEW_STEPS,
                 '--config.data.name=sklearn_digits', f'--config.data.data_dir={digits_dir}',
                 '--config.model.bn_group_size=8')
  check_workdir(tmp_path, 4, 360)


def test_imagenet_paper_config_on_photos(tmp_path, photos_dir):
  # Small JPEGs, so the test shrinks the crops (the code path is the paper's), with grain
  # worker processes and the final 10-crop evaluation.
  helpers.run_py('--config=configs/imagenet.py:resnet18', f'--workdir={tmp_path}', *FEW_STEPS,
                 '--config.data.name=sample_photos', f'--config.data.data_dir={photos_dir}',
                 '--config.data.eval_split=test', '--config.model.bn_group_size=2',
                 '--config.data.image_size=32', '--config.data.scale_range=(36, 48)',
                 '--config.data.eval_resize=36', '--config.data.workers=2',
                 '--config.parallel=pmap')
  check_workdir(tmp_path, 4, 8)
  final = helpers.read_jsonl(tmp_path / 'metrics.jsonl')[-1]
  assert final['eval_ten_crop_num_examples'] == 8


@pytest.mark.end_to_end
def test_quickstart_learns_the_digits(tmp_path, digits_dir):
  """The README's main job, unchanged: below 5% test error (about 2 minutes on 2 cores).

  As a user runs it: one XLA device, cpu_kernels=auto (the CPU plugin where it works).
  """
  helpers.run_py(f'--workdir={tmp_path}', f'--config.data.data_dir={digits_dir}',
                 env={'XLA_FLAGS': '', 'RESNET_JAX_CPU_KERNELS': ''})
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['cpu_kernels_used']  # what auto resolved to on this machine
  final = [line for line in helpers.read_jsonl(tmp_path / 'metrics.jsonl')
           if 'eval_top1_error' in line][-1]
  assert final['eval_top1_error'] < 0.05, final
  assert final['eval_num_examples'] == 360


def test_training_evaluation_and_export_never_import_tensorflow(tmp_path, digits_dir):
  """Training hosts need no TensorFlow: a run in one process (train, evaluate, resume,
  export) leaves it out of sys.modules even where it is installed."""
  code = f"""
import sys
from configs import default
from resnet_jax import config_lib, eval_checkpoint, export, train
from tests.support import helpers
config = helpers.small_config(**{{'data.data_dir': {digits_dir!r}, 'num_train_steps': 4}})
train.train_and_evaluate(config, {str(tmp_path)!r})
config.num_train_steps = 6
train.train_and_evaluate(config, {str(tmp_path)!r})
eval_checkpoint.evaluate_checkpoint(config, {str(tmp_path)!r})
export.export_checkpoint(config, {str(tmp_path)!r}, 'latest')
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras'))
assert not loaded, loaded
print('no tensorflow')
"""
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=helpers.REPO, timeout=600)
  assert result.returncode == 0 and 'no tensorflow' in result.stdout, result.stderr[-3000:]


def test_describe_prints_layers_params_and_multiply_adds():
  out = helpers.run_py('--mode=describe', '--config.model.name=resnet56').stdout
  assert 'stage3_block9/conv2' in out
  assert 'trainable parameters: 853,018 (0.85M)' in out
  assert 'multiply-adds:        125,485,696' in out
  out = helpers.run_py('--mode=describe', '--config=configs/imagenet.py:resnet50').stdout
  assert '25,557,032' in out and '(3.86 x 10^9 per image)' in out


@pytest.mark.parametrize('args,message', [
    (['--config.model.nme=resnet20'], "unknown config field 'nme'"),
    (['--config.model.name=resnet21'], 'Unknown model .resnet21.. Valid names: resnet20'),
    (['--config.model.shortcut=B', '--config.model.name=plain20'],
     "Option 'shortcut' does not apply to plain20"),
    (['--config.batch_size=18'], 'batch_size=18 is not divisible by the 4 devices'),
    (['--config.data.eval_split=validation'],
     "sklearn_digits has no split 'validation'. Available splits: test, train"),
    (['--config.data.name=no_such_data'], "Unknown data set 'no_such_data'"),
    (['--config=configs/cifar10.py:resnet21'], 'use NET or NET,val with NET one of'),
    # Checked at the start, not after the last step (whose checkpoint it would block).
    (['--config.data.final_eval_crop=ten_crop'],
     'config.data.final_eval_crop=ten_crop needs config.data.eval_resize > image_size'),
    (['--config.data.final_eval_crop=tencrop'], "config.data.final_eval_crop='tencrop'; choose"),
])
def test_bad_input_fails_at_start_with_a_clear_message(tmp_path, digits_dir, args, message):
  result = helpers.run_py(f'--workdir={tmp_path}', f'--config.data.data_dir={digits_dir}', *args,
                          check=False)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert re.search(message, result.stderr), result.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_imagenet_not_prepared_names_the_tars_and_the_command(tmp_path):
  result = helpers.run_py('--config=configs/imagenet.py:resnet50', f'--workdir={tmp_path}',
                          f'--config.data.data_dir={tmp_path / "tfds"}', check=False)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  for text in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar', 'downloads/manual',
               'python run.py --mode=prepare'):
    assert text in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope='module')
def sample_imagenet(tmp_path_factory):
  """The real imagenet2012 builder, prepared through run.py from a manual_dir of real photos
  (preparing it needs TensorFlow: the `prepare` extra)."""
  pytest.importorskip('tensorflow', reason="preparing imagenet2012 needs the 'prepare' extra")
  from resnet_jax.datasets import sample_imagenet as sample  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('imagenet')
  manual, data = root / 'manual', root / 'tfds'
  synsets = sample.write_manual_dir(str(manual), train_per_class=4, num_val=8)
  out = helpers.run_py('--mode=prepare', '--config=configs/imagenet.py:resnet18',
                       f'--config.data.data_dir={data}', f'--config.data.manual_dir={manual}')
  assert "'train': 32" in out.stdout and "'validation': 8" in out.stdout, out.stdout
  return str(data), synsets


@pytest.mark.tensorflow
def test_imagenet_from_the_users_tars_trains_resnet18(tmp_path, sample_imagenet):
  data_dir, _ = sample_imagenet
  helpers.run_py('--config=configs/imagenet.py:resnet18', f'--workdir={tmp_path}',
                 f'--config.data.data_dir={data_dir}', '--config.model.bn_group_size=0',
                 *FEW_STEPS[:1], '--config.batch_size=8', '--config.eval_batch_size=8',
                 '--config.log_every_steps=2', '--config.eval_every_steps=4',
                 '--config.checkpoint_every_steps=4')
  lines = helpers.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [line['step'] for line in lines if 'train_loss' in line] == [2, 4]
  (final,) = [line for line in lines if 'eval_loss' in line]
  assert final['eval_num_examples'] == 8
  # The paper's protocol: centre crop on the way, 10-crop at the end (and per-pixel mean).
  assert final['eval_ten_crop_num_examples'] == 8 and 0 <= final['eval_ten_crop_top1_error'] <= 1
  assert any(name.startswith('resnet_jax_pixel_mean_') for name in os.listdir(
      os.path.join(data_dir, 'imagenet2012', '5.1.0')))
  # Multi-scale fully-convolutional testing (paper Sec. 3.4): every example once.
  out = helpers.run_py('--mode=eval', f'--workdir={tmp_path}', '--config.data.eval_crop=multi_scale',
                       '--config.data.multi_scale_sides=(32, 48)', '--config.eval_batch_size=8')
  result = json.loads(out.stdout[out.stdout.index('{'):])
  assert result['eval_crop'] == 'multi_scale' and result['num_examples'] == 8
  assert 0 <= result['top5_error'] <= result['top1_error'] <= 1


OFFLINE = ('import errno, socket\n'
           'def _unreachable(*args, **kwargs):\n'
           '  raise OSError(errno.ENETUNREACH, "Network is unreachable")\n'
           'socket.socket.connect = socket.create_connection = _unreachable\n'
           'def _no_dns(*args, **kwargs):\n'
           '  raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")\n'
           'socket.getaddrinfo = _no_dns\n'
           # tfds retries a failed download 10 times over 3.5 minutes: once is enough here.
           'from tensorflow_datasets.core.download import downloader\n'
           'downloader.MAX_RETRIES = 0\n')


def test_a_data_set_that_cannot_be_downloaded_says_what_to_do(tmp_path):
  """A compute node without internet: one message, the host, and the two ways out."""
  result = helpers.run_py('--config=configs/cifar10.py:resnet20', f'--workdir={tmp_path / "w"}',
                          f'--config.data.data_dir={tmp_path / "tfds"}', prelude=OFFLINE,
                          check=False)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  message = result.stderr[result.stderr.index('error: '):]
  for text in ("Cannot download the tfds data set 'cifar10': www.cs.toronto.edu cannot be "
               'reached', 'Prepare it on a machine with internet', '--config.data.data_dir=',
               'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
               f'{tmp_path / "tfds"}/downloads/manual', '--config.data.manual_dir'):
    assert text in message, message
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_only_expected_errors_lose_their_traceback(tmp_path, digits_dir):
  """A ValueError from a bug is not a user error: its traceback must show."""
  bug = ('from resnet_jax import train\n'
         'def _bug(*args, **kwargs):\n'
         '  raise ValueError("a bug deep inside")\n'
         'train.train_and_evaluate = _bug\n')
  result = helpers.run_py(f'--workdir={tmp_path}', f'--config.data.data_dir={digits_dir}',
                          prelude=bug, check=False)
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'ValueError: a bug deep inside' in result.stderr
