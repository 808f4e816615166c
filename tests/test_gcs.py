"""gs:// workdirs and data directories, for real: a GCS emulator on 127.0.0.1 reached through
the same client stack as on a TPU VM (gcsfs or TensorFlow's GCS filesystem, tensorstore,
google-cloud-storage, array_record's reader).

Training reads its data set from the bucket, checkpoints to the bucket, stops
on SIGTERM and resumes exactly, and --mode=eval works on the same bucket; nothing
lands on the local disk. (Sweeps and reports on gs://: tests/test_sweep.py.)
"""
import json
import signal

from etils import epath

from tests.support import helpers
from tests.conftest import TRAIN
from tests.test_checkpoints import _start, _wait_for, assert_same_state, results, saved_state


def test_a_run_on_gs_reads_its_data_there_resumes_exactly_and_evaluates(
    gcs_env, empty_cwd, digits_dir, straight):
  workdir, data_dir = 'gs://bucket/run', 'gs://bucket/tfds'
  for path in epath.Path(digits_dir).glob('sklearn_digits/*/*'):
    if not path.name.startswith('resnet_jax_pixel_mean'):  # the run computes its own
      (epath.Path(data_dir) / path.relative_to(digits_dir)).write_bytes(path.read_bytes())
  args = [f'--config.data.data_dir={data_dir}', '--config.num_train_steps=24', *TRAIN]
  process = _start(workdir, args)
  metrics = epath.Path(workdir) / 'metrics.jsonl'
  _wait_for(process, lambda: metrics.exists() and '"train_loss"' in metrics.read_text())
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  assert 'SIGTERM: saved a checkpoint at step' in stderr
  stopped_at, _ = saved_state(workdir)
  assert 4 <= stopped_at < 24

  helpers.run_py(f'--workdir={workdir}', *args)  # the same command continues
  step, resumed = saved_state(workdir)
  _, expected = saved_state(straight)
  assert step == 24
  assert_same_state(resumed, expected)
  assert results(workdir) == results(straight)

  out = helpers.run_py('--mode=eval', f'--workdir={workdir}', '--checkpoint=best')
  printed = json.loads(out.stdout[out.stdout.index('{'):])
  assert json.loads((epath.Path(workdir) / 'eval_results.json').read_text()) == printed
  assert printed['num_examples'] == 360

  objects = set(gcs_env.objects())
  for name in ('config.json', 'metrics.jsonl', 'eval_results.json', 'checkpoints/24/state/_METADATA'):
    assert f'run/{name}' in objects
  assert any(o.startswith('run/events.out.tfevents') for o in objects)  # TensorBoard
  assert any(o.startswith('tfds/sklearn_digits/1.0.0/resnet_jax_pixel_mean_') for o in objects)
  assert helpers.nothing_written_locally(empty_cwd)
