"""resnet_jax entry point: flags, then one call per mode (resnet_jax/cli.py).

  python run.py --config=configs/default.py --workdir=/tmp/quickstart
  python run.py --mode=describe --config.model.name=resnet56
  python run.py --mode=eval --workdir=/tmp/quickstart --checkpoint=best
  python run.py --mode=export --workdir=/tmp/quickstart
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from resnet_jax import cli

try:  # The default config file is parsed, with its overrides, right here.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py'),
      'Config file (a parameter may follow a colon: configs/cifar10.py:resnet56).',
      lock_config=True)
except cli.CONFIG_ERRORS as error:
  sys.exit(cli.config_error_message(error, sys.argv))
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', cli.MODES, 'What to do.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  'For --mode=eval and export: latest, best or a step number.')
_DISTRIBUTED = flags.DEFINE_string(
    'distributed', '', 'Multi-host: "auto" (TPU VMs, SLURM: JAX finds its peers) or '
    '"HOST:PORT,NUM_PROCESSES,PROCESS_ID" (the coordinator is process 0). Empty: one process.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    cli.restart_for_cpu_kernels(_MODE.value, _CONFIG.value)  # first (see its docstring)
    cli.init_distributed(_DISTRIBUTED.value)
    cli.run(_MODE.value, _CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
            config_given=flags.FLAGS['config'].present,
            overrides=config_flags.get_override_values(flags.FLAGS['config']),
            config_path=config_flags.get_config_filename(flags.FLAGS['config']))
  except cli.user_errors() as e:  # the message says what is wrong and what to do
    sys.exit(f'error: {e}')
  except KeyboardInterrupt as e:  # before training started, or a third Ctrl-C
    print(f'interrupted: {e or "Ctrl-C"}', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
