"""resnet_jax entry point: flags, then one call per mode.

  python run.py --config=configs/default.py --workdir=/tmp/quickstart
  python run.py --mode=describe --config.model.name=resnet56
  python run.py --mode=eval --workdir=/tmp/quickstart --checkpoint=best
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py'),
    'Config file (a parameter may follow a colon: configs/cifar10.py:resnet56).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'describe', 'prepare'],
                          'What to do.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  'For --mode=eval: latest, best or a step number.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TensorFlow's C++ info lines
  from resnet_jax import cli  # pylint: disable=g-import-not-at-top  (flags first, then jax)
  cli.quiet_library_logs()
  cli.run(_MODE.value, _CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
          config_given=flags.FLAGS['config'].present,
          overrides=config_flags.get_override_values(flags.FLAGS['config']))


if __name__ == '__main__':
  app.run(main)
