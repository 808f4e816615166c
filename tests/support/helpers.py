"""Shared test helpers: small configs and running run.py as a user would."""
import contextlib
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import traceback

from etils import epath

from configs import default
from resnet_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(**overrides):
  """The quickstart config shrunk for tests: tiny batches, few steps."""
  config = default.get_config()
  config.batch_size = 16
  config.eval_batch_size = 40
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.schedule.name = 'constant'
  config.data.prefetch = 1
  for key, value in overrides.items():
    config_lib.set_field(config, key, value)
  return config


def run_py(*args, env=None, prelude='', check=True, timeout=600):
  """Runs run.py with `args` as a user would and returns its exit code, stdout and stderr.

  In this process where nothing needs a process of its own: the same flag parsing, main,
  messages and exit code as `python run.py`, without a new interpreter's start-up (about
  4 s of the suite's many short runs). In a subprocess where the run needs one: another
  environment (`env`), code to run first (`prelude`, e.g. tfds mock data), several hosts
  (--distributed), the CPU plugin's restart of the process for its malloc setting, or gs://
  paths (tensorboardX uploads its gs:// event files once more at the process's exit, which
  must come while the GCS emulator is up).
  """
  result = None
  if not env and not prelude and not any('gs://' in arg for arg in args):
    result = _run_py_here(args)
  if result is None:
    code = (f'{prelude}\nimport runpy, sys\nsys.argv = ["run.py"] + {list(args)!r}\n'
            f'runpy.run_path({os.path.join(REPO, "run.py")!r}, run_name="__main__")\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f'run.py {" ".join(args)} failed ({result.returncode}):\n'
                         f'{result.stderr[-6000:]}')
  return result


def _run_py_module(argv):
  """run.py imported afresh (not as __main__) for `argv`: ml_collections defines the
  --config.FIELD override flags when the config flag is declared, from sys.argv, so each
  run declares run.py's flags again, as a new process would."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  for name in list(flags.FLAGS):
    if name in ('config', 'workdir', 'mode', 'checkpoint', 'distributed') or name.startswith(
        'config.'):
      delattr(flags.FLAGS, name)
  spec = importlib.util.spec_from_file_location('resnet_jax_run_py', os.path.join(REPO, 'run.py'))
  module = importlib.util.module_from_spec(spec)
  with _argv(argv):
    spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def _argv(argv):
  saved, sys.argv = sys.argv, argv
  try:
    yield
  finally:
    sys.argv = saved


def _run_py_here(args):
  """run.py's flag parsing and main in this process, its output captured; None where the run
  needs a process of its own (see run_py)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  from resnet_jax import cli  # pylint: disable=import-outside-toplevel
  argv = ['run.py', *args]
  out, err = io.StringIO(), io.StringIO()
  absl_logging.use_absl_handler()  # as app.run does: absl's log lines on stderr
  stream = absl_logging.get_absl_handler().python_handler
  saved = stream.stream, absl_logging.get_verbosity(), logging.root.level
  stream.stream = err
  absl_logging.set_verbosity(absl_logging.INFO)
  code = 0
  try:
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(
        err), _argv(argv):
      try:
        module = _run_py_module(argv)
        argv = cli.parse_flags(argv)
        values = flags.FLAGS
        if values['distributed'].value or cli.restarts_for_cpu_kernels(
            values['mode'].value, values['config'].value):
          return None  # it would restart itself (cli.restart_for_cpu_kernels) or join hosts
        module.main(argv)
      except SystemExit as e:
        code = e.code
      except Exception:  # pylint: disable=broad-except  (as the interpreter reports it)
        err.write(traceback.format_exc())
        code = 1
  finally:
    stream.stream = saved[0]
    absl_logging.set_verbosity(saved[1])
    logging.root.setLevel(saved[2])
    flags.FLAGS.unparse_flags()
  if isinstance(code, str):  # sys.exit('error: ...'): the message on stderr, exit code 1
    err.write(code + '\n')
    code = 1
  return subprocess.CompletedProcess(['run.py', *args], code or 0, out.getvalue(),
                                     err.getvalue())


def nothing_written_locally(cwd) -> bool:
  """Whether `cwd` (the empty_cwd fixture) and the checkout hold no file a gs:// path
  mistaken for a local one would have made."""
  return os.listdir(cwd) == [] and not os.path.exists(os.path.join(REPO, 'gs:'))


def read_jsonl(path):
  """A JSON-lines file, local or gs://."""
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
