"""Test set-up: 8 fake CPU devices (before jax is imported) and shared helpers."""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for `configs`

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """A tfds data_dir with sklearn_digits prepared (about a second)."""
  from resnet_jax import input_pipeline
  from tests import helpers
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  input_pipeline.get_builder(helpers.small_config(**{'data.data_dir': data_dir}).data)
  return data_dir
