"""Test set-up: 4 fake CPU devices (before jax is imported) and shared helpers.

The core runs as on any backend, with the CPU plugin off (config.cpu_kernels
'auto' resolves to off through $RESNET_JAX_CPU_KERNELS); the plugin's own tests,
and the quickstart test that runs as a user does, turn it on.
"""
import os
import sys
import tempfile

# 4 devices: every sharding the tests check (a batch split over devices, BN groups across
# them, pmap against jit, 2 hosts x 2 devices against 1 process x 4), at a lower cost than
# 8 (a 12-step run.py on 2 cores: 22 -> 17 s cold, 10 -> 8.7 s warm).
DEVICES = 4
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={DEVICES}').strip()
os.environ.setdefault('RESNET_JAX_CPU_KERNELS', 'off')

# One persistent XLA compilation cache for the session, this process and every run.py it
# starts: the tests train the same small nets in many processes, and each compiled them
# again (a 6-step run through run.py: 21 s cold, 8 s warm on 2 cores). Entries are keyed
# on the program, backend and flags, so results are the same; the folder goes at exit.
_XLA_CACHE = tempfile.TemporaryDirectory(prefix='resnet_jax_test_xla_cache_')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _XLA_CACHE.name)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for `configs`

import pytest  # noqa: E402

from tests.support import gcs_emulator  # noqa: E402  (before TensorFlow is imported: see its docstring)

# Small training runs through run.py that the checkpoint tests share.
TRAIN = ['--config.batch_size=16', '--config.eval_batch_size=64', '--config.log_every_steps=4',
         '--config.eval_every_steps=6', '--config.checkpoint_every_steps=6']


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """A tfds data_dir with sklearn_digits prepared (about a second)."""
  from resnet_jax.data import builders
  from tests.support import helpers
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builders.get_builder(helpers.small_config(**{'data.data_dir': data_dir}).data)
  return data_dir


@pytest.fixture(scope='session')
def photos_dir(tmp_path_factory):
  """A tfds data_dir with sample_photos prepared: 40 train and 8 test JPEGs of real photos
  (long side 120), written without TensorFlow (a few seconds)."""
  from resnet_jax.datasets import sample_photos
  data_dir = str(tmp_path_factory.mktemp('photos'))
  sample_photos.prepare(data_dir, num_train=40, num_test=8, long_side=120)
  return data_dir


def _train_run(tmp_path_factory, name, digits_dir, steps):
  """A workdir trained through run.py with the TRAIN flags for `steps` steps on DEVICES devices."""
  from tests.support import helpers
  workdir = tmp_path_factory.mktemp(name)
  helpers.run_py(f'--workdir={workdir}', f'--config.data.data_dir={digits_dir}',
                 f'--config.num_train_steps={steps}', *TRAIN)
  return workdir


@pytest.fixture(scope='session')
def straight(tmp_path_factory, digits_dir):
  """24 steps without interruption: what every interrupted run must reproduce exactly."""
  return _train_run(tmp_path_factory, 'straight', digits_dir, 24)


@pytest.fixture(scope='session')
def gcs():
  """A GCS emulator on 127.0.0.1 with the bucket gs://bucket (tests/support/gcs_emulator.py)."""
  reason = gcs_emulator.available()
  if reason:
    pytest.skip(f'no GCS emulator here: {reason}')
  emulator = gcs_emulator.GcsEmulator(buckets=('bucket',))
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs_env(gcs, monkeypatch):
  """The emulator's variables in this process (to read back what runs write) and its children."""
  for key, value in gcs.env.items():
    monkeypatch.setenv(key, value)
  return gcs


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
  """An empty working directory: a gs:// path mistaken for a local one would land in it
  (check with helpers.nothing_written_locally)."""
  local = tmp_path / 'cwd'
  local.mkdir()
  monkeypatch.chdir(local)
  return local


@pytest.fixture(scope='session')
def trained(tmp_path_factory, digits_dir):
  """A workdir trained for 12 steps on DEVICES devices, checkpoints at 6 and 12 (copy it
  before changing it)."""
  return _train_run(tmp_path_factory, 'trained', digits_dir, 12)
