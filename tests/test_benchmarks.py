"""The benchmark scripts run (tiny sizes): the GPU one needs only jax, flax and optax."""
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from tests.support import helpers

BLOCK = ('import sys\n'
         'class Block:\n'
         '  def find_spec(self, name, path=None, target=None):\n'
         '    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu", '
         '"ml_collections", "torch"):\n'
         '      raise ImportError("not on the GPU machine: " + name)\n'
         'sys.meta_path.insert(0, Block())\n')


# A sitecustomize that hides TensorFlow from every Python process started with it on
# PYTHONPATH (grain's worker processes too): `import tensorflow` fails as if it were not
# installed, and importlib.util.find_spec('tensorflow') is None.
HIDE_TENSORFLOW = ('import sys\n'
                   'class _Hide:\n'
                   '  def __init__(self, finder):\n'
                   '    self.finder = finder\n'
                   '  def find_spec(self, name, path=None, target=None):\n'
                   '    if name.split(".")[0] == "tensorflow":\n'
                   '      return None\n'
                   '    return self.finder.find_spec(name, path, target)\n'
                   '  def __getattr__(self, attr):\n'
                   '    return getattr(self.finder, attr)\n'
                   'sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]\n')


def test_gpu_bench_runs_with_only_jax_flax_optax():
  script = os.path.join(helpers.REPO, 'benchmarks', 'gpu_bench.py')
  # ResNet-20 (the benchmark's code path for any model, at a fraction of ResNet-18's compile).
  code = (BLOCK + f'sys.argv = [{script!r}, "--model=resnet20", "--batch=2", "--image=32", '
          '"--steps=1"]\nimport runpy\nrunpy.run_path(sys.argv[0], run_name="__main__")\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env={**os.environ, 'XLA_FLAGS': ''}, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line for line in out.stdout.splitlines() if line.startswith('resnet_jax resnet20')]
  assert [row.split()[2] for row in rows] == ['bfloat16', 'float32']
  assert all(float(row.split()[3]) > 0 for row in rows)  # images/s


def test_cpu_step_profile_groups_the_traced_ops():
  script = os.path.join(helpers.REPO, 'benchmarks', 'cpu_step_profile.py')
  out = subprocess.run([sys.executable, script, '--batch=4', '--image=8', '--steps=1',
                        '--options=cpu_kernels=off'],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split(None, 3) for line in out.stdout.splitlines()[3:]]
  groups = {row[3]: float(row[0]) for row in rows}
  convs = [g for g in groups if g.startswith('conv ')]
  # Forward, input- and kernel-gradient convolutions of ResNet-20, each timed.
  assert any(g.endswith('-> f32[4,8,8,16]') for g in convs), groups
  assert any(g.endswith(('-> f32[3,3,16,16]', '-> f32[16,3,3,16]')) for g in convs), groups
  assert all(ms > 0 for ms in groups.values())
  total = float(out.stdout.splitlines()[1].split('ops ')[1].split()[0])
  assert abs(total - sum(groups.values())) <= 0.05 * len(groups) + 0.01  # rows rounded to 0.1


def test_compare_options_times_each_variant_in_one_process():
  script = os.path.join(helpers.REPO, 'benchmarks', 'compare_options.py')
  out = subprocess.run([sys.executable, script, '--variant=cpu_kernels=off,bn_fast_variance=True',
                        '--variant=', '--batch=4', '--image=8', '--steps=1', '--blocks=2'],
                       capture_output=True, text=True, check=False,
                       env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'jit on 2 XLA device(s)' in out.stdout
  rows = out.stdout.splitlines()[3:]
  assert [row.split()[0].split(',')[0] for row in rows] == ['cpu_kernels=off', 'defaults']
  for row in rows:
    ips, cpu_ms, system_ms, *blocks = row.split()[-5:]
    assert float(ips) > 0 and 0 <= float(system_ms) <= float(cpu_ms)
    assert len(blocks) == 2
  for variant, error in (('cpu_kernels', 'expected KEY=VALUE'),
                         ('cpu_kernels=fast', "cpu_kernels='fast'; choose one of auto, on, off"),
                         ('bn_fast_varianse=True', 'does not apply to resnet20')):
    bad = subprocess.run([sys.executable, script, f'--variant={variant}'],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and error in bad.stderr, bad.stderr[-2000:]


def test_cpu_vs_torch_times_each_contender_in_turns():
  script = os.path.join(helpers.REPO, 'benchmarks', 'cpu_vs_torch.py')
  out = subprocess.run([sys.executable, script, '--batch=4', '--steps=1', '--rounds=2',
                        '--jax=jit:2', '--jax=pmap:1:--xla_cpu_multi_thread_eigen=false'],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line for line in out.stdout.splitlines() if line.startswith(('resnet_jax', 'PyTorch'))]
  names = ['resnet_jax jit, 2 XLA CPU devices ',
           'resnet_jax pmap, 1 XLA CPU device, --xla_cpu_multi_thread_eigen=false ']
  assert [row for row in rows if row.startswith('resnet_jax')] == [
      row for name in names for row in rows if row.startswith(name)], out.stdout
  for row in rows:
    *_, first, second = row.split()
    assert float(first) > 0 and float(second) > 0  # one block per round
  bad = subprocess.run([sys.executable, script, '--jax=jit'], capture_output=True, text=True,
                       check=False)
  assert bad.returncode == 2 and 'expected jit:N or pmap:N' in bad.stderr, bad.stderr[-2000:]


def test_compare_trees_times_two_source_trees_in_turns():
  script = os.path.join(helpers.REPO, 'benchmarks', 'compare_trees.py')
  out = subprocess.run([sys.executable, script, f'--tree=one={helpers.REPO}',
                        f'--tree=two={helpers.REPO}', '--batch=4', '--image=8', '--steps=1',
                        '--rounds=2'], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split() for line in out.stdout.splitlines()[2:]]
  assert [row[0] for row in rows] == ['one', 'two']
  assert rows[0][7] == '1.000' and float(rows[1][1]) > 0  # the first tree's ratio to itself
  assert len(rows[1]) == 15  # name, img/s, the ratios, and one block per round


def test_bn_statistics_compares_running_and_batch_statistics(straight):
  """On a trained run: per 3x3 layer, the eval-mode response and the variance of each BN's
  input on eval images and on training batches against its running variance."""
  import json  # pylint: disable=import-outside-toplevel
  script = os.path.join(helpers.REPO, 'benchmarks', 'bn_statistics.py')
  out = subprocess.run([sys.executable, script, f'--workdir={straight}', '--examples=64'],
                       capture_output=True, text=True, check=False, cwd=helpers.REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  assert result['step'] == 24
  layers = result['layers']
  assert [r['layer'] for r in layers[:2]] == ['stem_bn', 'stage1_block1/bn1'] and len(layers) == 19
  for r in layers:
    assert r['var_ratio_train_median'] > 0 and r['mean_abs_scale'] > 0
    assert len(r['worst_channels']) == 3
  # From the moments of each BN's input, the same eval-mode responses as the report's
  # analysis measures on the BN outputs of the same 64 images.
  from configs import default  # pylint: disable=import-outside-toplevel
  from resnet_jax import config_lib, report, train  # pylint: disable=import-outside-toplevel
  config = config_lib.load_saved_config(straight, default.get_config(), {})
  measured = report.analyse_member(config, train.setup(config), straight, max_examples=64)
  np.testing.assert_allclose([r['eval_mode_std'] for r in layers],
                             measured['final']['response_std_eval'], rtol=2e-3)


@pytest.fixture(scope='module')
def bench_dir(tmp_path_factory):
  """--data_dir of input_pipeline.py and end_to_end.py (their --quick data set, built once)."""
  return str(tmp_path_factory.mktemp('pipeline_bench'))


def _table(stdout: str) -> dict[str, list[str]]:
  """input_pipeline.py's rows: label -> the figures after it."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('pipeline '))
  rows = {}
  for line in lines[start + 1:]:
    label = ' '.join(line.split()[:3])
    rows[label] = line.split()[3:]
  return rows


def test_input_pipeline_times_grain_per_core_and_with_workers(bench_dir):
  """Each case per core and with 1 and 2 grain workers, the 1->2 scaling, and where
  TensorFlow is installed the tf.data reference and grain's ratio to it."""
  script = os.path.join(helpers.REPO, 'benchmarks', 'input_pipeline.py')
  out = subprocess.run([sys.executable, script, '--quick', '--repeats=1', f'--data_dir={bench_dir}',
                        '--cases=train:reference,train:inception'],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'sample_photos: 64 train / 16 test JPEGs' in out.stdout, out.stdout
  rows = _table(out.stdout)
  # img/s, grain/tf.data for 1 core, 1 worker, 2 workers; the 1->2 worker scaling; output.
  grain = rows['train grain inception']
  assert all(float(grain[i]) > 0 for i in (0, 2, 4)), grain
  assert grain[6].endswith('x') and float(grain[6][:-1]) > 0, grain
  assert grain[7:] == ['uint8', '[8,', '32,', '32,', '3]'], grain
  if importlib.util.find_spec('tensorflow') is None:
    assert 'tf.data reference rows skipped' in out.stdout, out.stdout
    return
  reference = rows['train tf.data reference']
  assert all(float(reference[i]) > 0 for i in (0, 2, 4)) and reference[1] == '-', reference
  assert reference[7:] == ['float32', '[8,', '32,', '32,', '3]'], reference
  for i in (0, 2, 4):  # grain's rate over tf.data's in the same setting (printed rounded)
    assert float(grain[i + 1][:-1]) == pytest.approx(float(grain[i]) / float(reference[i]),
                                                     rel=0.02, abs=0.01), (grain, reference)


def test_input_pipeline_runs_without_tensorflow(bench_dir, tmp_path):
  """Without TensorFlow the grain rows are measured and the tf.data rows are said skipped."""
  (tmp_path / 'sitecustomize.py').write_text(HIDE_TENSORFLOW)
  script = os.path.join(helpers.REPO, 'benchmarks', 'input_pipeline.py')
  out = subprocess.run([sys.executable, script, '--quick', '--repeats=1', f'--data_dir={bench_dir}',
                        '--cases=eval:reference,eval:ten_crop'], capture_output=True, text=True,
                       check=False, env={**os.environ, 'PYTHONPATH': str(tmp_path)})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'tf.data reference rows skipped: TensorFlow is not importable here.' in out.stdout
  rows = _table(out.stdout)
  assert list(rows) == ['eval grain ten_crop'], out.stdout
  figures = rows['eval grain ten_crop']
  assert all(float(figures[i]) > 0 for i in (0, 2, 4)) and figures[1] == '-', figures
  assert figures[7:] == ['uint8', '[8,', '10,', '32,', '32,', '3]'], figures


def test_end_to_end_compares_jpegs_with_synthetic_batches(bench_dir):
  script = os.path.join(helpers.REPO, 'benchmarks', 'end_to_end.py')
  out = subprocess.run([sys.executable, script, '--quick', '--workers=1',
                        f'--data_dir={bench_dir}'], capture_output=True, text=True, check=False,
                       env={**os.environ, 'XLA_FLAGS': ''})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'tiny (float32), batch 8, 32x32, 64 JPEGs, grain workers=1' in out.stdout, out.stdout
  names = ('synthetic (one fixed batch)', 'JPEGs, scale augmentation', 'JPEGs / synthetic')
  figures = {line[:32].strip(): line[32:].split() for line in out.stdout.splitlines()
             if line.startswith(names)}
  assert list(figures) == list(names), out.stdout
  for name in names[:2]:
    assert figures[name][1] == 'img/s' and float(figures[name][0]) > 0, out.stdout
  ratio = figures['JPEGs / synthetic'][0]
  assert ratio.endswith('x') and float(ratio[:-1]) > 0, out.stdout


# Hides what an accelerator host lacks (TensorFlow, scikit-learn, scikit-image) from every
# process started with it on PYTHONPATH.
HIDE_HOST_GAPS = HIDE_TENSORFLOW.replace('== "tensorflow"',
                                         'in ("tensorflow", "sklearn", "skimage")')


def test_gpu_end_to_end_trains_from_a_bundle_on_a_host_without_tensorflow(tmp_path):
  """The accelerator script on CPU with a small model: the bundle's wheels are unpacked onto
  the path, the JPEGs are made from the bundle's photos (no scikit-learn or -image), run.py
  trains from them, and its rate is printed beside gpu_bench.py's synthetic one."""
  from resnet_jax.datasets import sample_imagenet  # pylint: disable=import-outside-toplevel
  bundle = tmp_path / 'bundle'
  (bundle / 'wheels').mkdir(parents=True)
  sample_imagenet.save_photos(str(bundle / 'photos.npz'))
  # A wheel (a zip) of one module, standing in for the real ones (`bundle` downloads those).
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(bundle / 'wheels' / 'bundled_probe-1.0-py3-none-any.whl', 'w') as wheel:
    wheel.writestr('bundled_probe/__init__.py', 'FROM_BUNDLE = True\n')
  (tmp_path / 'sitecustomize.py').write_text(HIDE_HOST_GAPS)
  script = os.path.join(helpers.REPO, 'benchmarks', 'gpu_end_to_end.py')
  out = subprocess.run(
      [sys.executable, script, 'run', f'--bundle={bundle}', f'--data_dir={tmp_path / "data"}',
       '--model=resnet20', '--dtype=float32', '--image=32', '--batch=8', '--steps=4',
       '--log_every=2', '--bench_steps=2', '--train_images=48', '--test_images=8',
       '--workers=1'], capture_output=True, text=True, check=False,
      env={**os.environ, 'PYTHONPATH': str(tmp_path), 'XLA_FLAGS': ''})
  assert out.returncode == 0, out.stderr[-3000:]
  assert (bundle / 'site' / 'bundled_probe' / '__init__.py').exists()
  assert 'resnet20 (float32), batch 8, 32x32, on cpu; ' in out.stdout, out.stdout
  assert f'{len(os.sched_getaffinity(0))} CPU cores, grain workers=1; 48 JPEGs' in out.stdout
  names = ('run.py from JPEGs', 'gpu_bench.py, synthetic', 'JPEGs / synthetic')
  figures = {line[:34].strip(): line[34:].split() for line in out.stdout.splitlines()
             if line.startswith(names)}
  assert list(figures) == list(names), out.stdout
  jpegs, synthetic = (float(figures[name][0]) for name in names[:2])
  assert jpegs > 0 and synthetic > 0
  # The ratio of the unrounded rates, to 2 decimals: within 0.01 of the printed rates' ratio.
  ratio = figures['JPEGs / synthetic'][0]
  assert ratio.endswith('x') and float(ratio[:-1]) == pytest.approx(jpegs / synthetic, abs=0.011)
  assert 'median of 1 log windows of 2 steps after the first' in out.stdout


def test_gpu_end_to_end_runs_as_many_workers_as_shared_memory_holds():
  """A container's /dev/shm (64 MiB by default) would make run.py refuse one worker per
  core at start: the script lowers the count, and says so, before any device time."""
  from unittest import mock  # pylint: disable=import-outside-toplevel
  from resnet_jax.data import inputs  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      'gpu_end_to_end', os.path.join(helpers.REPO, 'benchmarks', 'gpu_end_to_end.py'))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  args = types.SimpleNamespace(workers=16, batch=256, image=224)
  pair = 2 * 256 * 224 * 224 * 3  # 77 MB: (16 x 6 + 1) of them take 7.5 GB
  with mock.patch.object(inputs, 'shared_memory_size', return_value=float('inf')):
    assert script.workers_that_fit(args) == (16, '')
  with mock.patch.object(inputs, 'shared_memory_size', return_value=(4 * 6 + 1) * pair):
    assert script.workers_that_fit(args) == (4, ' (16 asked for; /dev/shm holds 1.79 GiB)')
  with mock.patch.object(inputs, 'shared_memory_size', return_value=64 * 2**20):
    assert script.workers_that_fit(args) == (
        0, ' (16 asked for; /dev/shm holds 0.06 GiB, so threads)')


def test_jpeg_decoders_times_each_decoder_on_each_case():
  """Three cases (full scale, 1/4 DCT scale, an Inception window), each decoder that is
  installed timed in each (the pip ones always); the others said not usable."""
  script = os.path.join(helpers.REPO, 'benchmarks', 'jpeg_decoders.py')
  out = subprocess.run([sys.executable, script, '--images=8', '--repeats=1', '--long_side=120'],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  cases = [line for line in out.stdout.splitlines() if not line.startswith(' ')
           and 'JPEGs, one thread' in line]
  assert [case.split(' (')[0] for case in cases] == [
      '120px, full scale', '2000px, 1/4 scale', '120px, an Inception window'], out.stdout
  rows = [line.split() for line in out.stdout.splitlines() if line.startswith('  ')]
  names = [' '.join(row[:-4]) for row in rows]
  unusable = [line.split(':')[0] for line in out.stdout.splitlines()
              if 'not usable here' in line]
  candidates = ['pillow (draft)', 'simplejpeg', 'simplejpeg (fast IDCT)',
                'opencv (IMREAD_REDUCED)', 'PyTurboJPEG', 'tensorflow (eager)']
  usable = [name for name in candidates if name not in unusable]
  assert usable[:4] == candidates[:4] and names == usable * 3, out.stdout
  if importlib.util.find_spec('tensorflow') is not None:
    assert 'tensorflow (eager)' in usable
  assert all(float(row[-4]) > 0 and row[-3] == 'img/s' for row in rows), out.stdout
  assert [row[-2] for row in rows[::len(usable)]] == ['1.00x'] * 3  # Pillow against itself


@pytest.mark.tensorflow
def test_tfdata_over_arrayrecord_is_timed_beside_grain(bench_dir):
  """tf.data fed from the ArrayRecord data set (what keeping tf.data for the Inception crop
  would take), each case beside grain's per core count, with its ratio to the best grain."""
  if importlib.util.find_spec('tensorflow') is None:
    pytest.skip("needs TensorFlow (the 'prepare' extra)")
  script = os.path.join(helpers.REPO, 'benchmarks', 'tfdata_arrayrecord.py')
  out = subprocess.run([sys.executable, script, '--quick', '--repeats=1',
                        f'--data_dir={bench_dir}'], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split() for line in out.stdout.splitlines() if line[:1] in ('1', '2')]
  assert [(row[0], ' '.join(row[1:-3])) for row in rows] == [
      ('1', 'grain, 1 thread'), ('1', 'tf.data over ArrayRecord'), ('2', 'grain, 2 threads'),
      ('2', 'grain, 2 workers'), ('2', 'tf.data over ArrayRecord')], out.stdout
  assert all(float(row[-3]) > 0 and float(row[-1]) == pytest.approx(float(row[-3]), abs=0.5)
             for row in rows), out.stdout  # img/s, and the one round's figure
  for cores in ('1', '2'):
    mine = [row for row in rows if row[0] == cores]
    best = max(float(row[-3]) for row in mine if row[1] == 'grain,')
    for row in mine:  # the unrounded rates' ratio, to 2 decimals, against the printed rates'
      assert row[-2].endswith('x') and float(row[-2][:-1]) == pytest.approx(
          float(row[-3]) / best, abs=0.011), out.stdout


def test_tfdata_over_arrayrecord_says_it_needs_tensorflow(tmp_path):
  (tmp_path / 'sitecustomize.py').write_text(HIDE_TENSORFLOW)
  script = os.path.join(helpers.REPO, 'benchmarks', 'tfdata_arrayrecord.py')
  out = subprocess.run([sys.executable, script, '--quick'], capture_output=True, text=True,
                       check=False, env={**os.environ, 'PYTHONPATH': str(tmp_path)})
  assert out.returncode == 1 and "needs TensorFlow" in out.stderr, out.stderr[-2000:]
  assert "pip install -e '.[prepare]'" in out.stderr
