"""Shared test helpers: small configs and running run.py as a user would."""
import json
import os
import subprocess
import sys

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
  """Runs run.py in a subprocess (optionally after `prelude` code, e.g. tfds mock data)."""
  code = (f'{prelude}\nimport runpy, sys\nsys.argv = ["run.py"] + {list(args)!r}\n'
          f'runpy.run_path({os.path.join(REPO, "run.py")!r}, run_name="__main__")\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f'run.py {" ".join(args)} failed ({result.returncode}):\n'
                         f'{result.stderr[-6000:]}')
  return result


def read_jsonl(path):
  """A JSON-lines file, local or gs://."""
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
