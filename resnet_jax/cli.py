"""What each `run.py --mode` does; run.py only parses flags."""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import ml_collections
from absl import flags
from absl import logging as absl_logging

from resnet_jax import config_lib
from resnet_jax import errors

MODES = ('train', 'eval', 'describe', 'prepare', 'convert', 'sweep', 'report', 'export')
CONFIG_ERRORS = (AttributeError, KeyError, TypeError, ValueError)

# Libraries whose INFO lines drown the training log (warnings still show).
_CHATTY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/xla_bridge.py')


def quiet_library_logs() -> None:
  """Library INFO lines off; orbax's error records without their tracebacks; tensorstore's
  callbacks into a closed event loop unprinted.

  A failed checkpoint read or write (a damaged file, a full disk) ends with
  one line from resnet_jax saying what to do. Before it, orbax logs the error
  with a traceback from each of its threads, and tensorstore, finishing the
  other reads and writes after orbax closed their event loop, prints a
  `RuntimeError: Event loop is closed` traceback for each (thousands for a
  large model): noise that hides the line that matters.
  """
  def keep(record: logging.LogRecord) -> bool:
    if '/asyncio/' in record.pathname and 'exception was never retrieved' in str(record.msg):
      return False  # orbax's other reads or writes of the failed one, collected at exit
    if '/orbax/' in record.pathname and record.levelno >= logging.ERROR and record.exc_info:
      record.msg = f'{record.getMessage()} ({record.exc_info[0].__name__}: ' + (
          str(record.exc_info[1]).splitlines() or [''])[0][:300] + ')'
      record.args, record.exc_info, record.exc_text = (), None, None
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _CHATTY)
  handler = absl_logging.get_absl_handler()
  if any(getattr(f, 'quiets_libraries', False) for f in handler.filters):
    return  # set already: a second run in this process (tests run several)
  keep.quiets_libraries = True
  handler.addFilter(keep)

  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, traceback):
    if not (kind is RuntimeError and str(value) == 'Event loop is closed'):
      previous_hook(kind, value, traceback)

  def unraisablehook(unraisable):
    if not (isinstance(unraisable.exc_value, (RuntimeError, ImportError)) and str(
        unraisable.exc_value).startswith(('Event loop is closed', 'sys.meta_path is None'))):
      previous_unraisable(unraisable)
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def config_error_message(error: Exception, argv: list[str]) -> str:
  """A plain message for a --config.FIELD=VALUE override that does not fit the config."""
  overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
  if isinstance(error, (AttributeError, KeyError)):
    detail = error
    while isinstance(detail, (AttributeError, KeyError)) and detail.args:
      detail = detail.args[0]  # ml_collections wraps the KeyError's message
    problem = 'unknown config field ' + ' '.join(str(detail).split('\n'))
  else:
    problem = f'{type(error).__name__}: {error}'
  return (f'error: a --config.FIELD=VALUE override does not fit the config: {problem}\n'
          f'Overrides given: {overrides}\nEvery field, its type and its meaning: '
          'configs/default.py.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that ends with a plain message, not a traceback, on bad flags."""
  try:
    argv = flags.FLAGS(argv)
    getattr(flags.FLAGS['config'].value, 'keys')  # a file that failed to load raises here
    return argv
  except OSError as e:  # config_flags: the --config file cannot be read
    detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise SystemExit(f'error: --config: cannot load the config file ({detail}).') from None
  except CONFIG_ERRORS as e:
    raise SystemExit(config_error_message(e, argv)) from None
  except flags.Error as e:
    message = str(e)
    if 'Error whilst parsing config file' in message:  # keep the config file's own message
      message = [line for line in message.splitlines() if line.strip()][-1]
    raise SystemExit(f'error: {message}\nUsage: python run.py --config=configs/X.py --workdir=DIR '
                     f'[--mode={"|".join(MODES)}] [--config.FIELD=VALUE ...]') from None


def user_errors() -> tuple[type[BaseException], ...]:
  """Errors whose message is the whole story for a user: no traceback needed.

  Only the expected ones (a bad config, missing data, a bad checkpoint, a
  diverged run); any other exception, ValueError included, keeps its traceback.
  """
  return (errors.UserError,)


def restart_for_cpu_kernels(mode: str, config: ml_collections.ConfigDict) -> None:
  """Restarts this process with the CPU plugin's malloc setting (resnet_jax/cpu/malloc.py)
  where the plugin may run steps: a CPU-only host, config.cpu_kernels not off.

  First thing in main: glibc reads the setting at start-up, and a process that
  has joined a multi-host run must not restart.
  """
  if restarts_for_cpu_kernels(mode, config):
    from resnet_jax.cpu import malloc  # pylint: disable=g-import-not-at-top
    malloc.reexec_with_huge_pages()


def restarts_for_cpu_kernels(mode: str, config: ml_collections.ConfigDict) -> bool:
  """Whether restart_for_cpu_kernels restarts a run of `mode` with `config` (where the
  malloc setting is not already in place)."""
  from resnet_jax import backend  # pylint: disable=g-import-not-at-top
  return (mode in ('train', 'eval', 'sweep', 'report')
          and backend.cpu_kernel_mode(config.cpu_kernels) != 'off'
          and backend.likely_cpu_only())


def init_distributed(spec: str) -> None:
  """Joins a multi-process run (`--distributed`) before JAX touches any device."""
  if not spec:
    return
  coordinator = () if spec == 'auto' else _parse_distributed(spec)  # auto: JAX finds it
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts; no-op elsewhere
  jax.distributed.initialize(*coordinator)
  if cached_cpu_collectives_hang(jax.__version_info__, jax.default_backend(),
                                 jax.config.jax_compilation_cache_dir,
                                 jax.config.jax_enable_compilation_cache):
    absl_logging.warning(
        'Persistent compilation cache off for this run (%s): jax %s hangs in CPU collectives '
        'of programs loaded from it when several processes run.',
        jax.config.jax_compilation_cache_dir, jax.__version__)
    jax.config.update('jax_enable_compilation_cache', False)


def cached_cpu_collectives_hang(version: tuple[int, ...], backend: str, cache_dir: str | None,
                                cache_enabled: bool) -> bool:
  """Whether a multi-process run must not read the persistent compilation cache: with jax
  0.12 (0.12.1 measured; 0.10.2 and 0.11.2 do not), CPU programs whose collectives go
  through gloo never finish once loaded from the cache, so the second run of the same
  command hangs at its first step. GPU and TPU are not known to."""
  return backend == 'cpu' and tuple(version[:2]) >= (0, 12) and bool(cache_dir) and cache_enabled


def _parse_distributed(spec: str) -> tuple[str, int, int]:
  """HOST:PORT,NUM_PROCESSES,PROCESS_ID of `--distributed`."""
  try:
    address, num_processes, process_id = spec.split(',')
    num_processes, process_id = int(num_processes), int(process_id)
  except ValueError:
    raise errors.ConfigError(f'--distributed={spec!r}: use "auto" or HOST:PORT,NUM_PROCESSES,PROCESS_ID, '
                     'e.g. 10.0.0.1:1234,2,0 on the first host and 10.0.0.1:1234,2,1 on the '
                     'second.') from None
  return address, num_processes, process_id


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | None, *, checkpoint: str,
        config_given: bool, overrides: dict[str, Any], config_path: str = '') -> None:
  """Runs one mode; `overrides` are the --config.FIELD=VALUE flags (re-applied for eval)."""
  quiet_library_logs()
  if mode == 'describe':
    from resnet_jax import models, summary  # pylint: disable=g-import-not-at-top
    model = models.create_model_from_config(config.model, _describe_classes(config))
    size = config.data.image_size
    print(summary.describe(model, (size, size, 3), config.model.name))
    return
  if mode == 'prepare':
    from resnet_jax.data import builders  # pylint: disable=g-import-not-at-top
    builder = builders.prepare(config.data)
    print(f'{builder.name} is ready in {builder.data_dir}: '
          f'{ {str(k): v.num_examples for k, v in builder.info.splits.items()} }')
    return
  if mode == 'convert':
    from resnet_jax.data import builders, convert  # pylint: disable=g-import-not-at-top
    builder = builders.get_builder(config.data, prepare=False)
    if not builder.is_prepared():
      raise SystemExit(f'{builder.name} is not prepared in {builder.data_dir_root}: nothing to '
                       'convert (--mode=prepare writes ArrayRecord directly).')
    count = convert.convert(builder.data_dir)
    print(f'{builder.name} in {builder.data_dir}: {count} records converted to ArrayRecord.')
    return
  if not workdir:
    raise SystemExit(f'--mode={mode} needs --workdir=DIR.')
  if mode in ('train', 'sweep'):
    from resnet_jax import train  # pylint: disable=g-import-not-at-top
    try:
      _train_or_sweep(mode, config, workdir, config_path)
    except train.Preempted as e:  # a clean stop: exit 0, the same command resumes
      absl_logging.warning('%s', e)
  elif mode == 'report':
    from resnet_jax import report  # pylint: disable=g-import-not-at-top
    print(json.dumps(report.report(workdir, config, overrides), indent=2))
  elif mode == 'eval':
    from resnet_jax import eval_checkpoint  # pylint: disable=g-import-not-at-top
    if not config_given:
      config = config_lib.load_saved_config(workdir, config, overrides)
    result = eval_checkpoint.evaluate_checkpoint(config, workdir, checkpoint)
    print(json.dumps(result, indent=2))
  elif mode == 'export':
    from resnet_jax import export  # pylint: disable=g-import-not-at-top
    if not config_given:
      config = config_lib.load_saved_config(workdir, config, overrides)
    print(json.dumps(export.export_checkpoint(config, workdir, checkpoint), indent=2))


def _train_or_sweep(mode: str, config: ml_collections.ConfigDict, workdir: str,
                    config_path: str) -> None:
  if mode == 'train':
    from resnet_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
    return
  from resnet_jax import sweep  # pylint: disable=g-import-not-at-top
  rows = sweep.run_sweep(config, config_path, workdir)
  if sweep.jax.process_index() == 0:
    print(sweep.summary_path(workdir, 'md').read_text())
  if any(r['status'] == 'failed' for r in rows):
    raise SystemExit('error: some sweep members failed; see the log above (and their FAILED '
                     'files; delete one to retry that member).')
  elsewhere = [r['member'] for r in rows if r['status'] != 'finished']
  if elsewhere:
    absl_logging.warning('Members %s are being trained by another process (or were stopped '
                         'there); its summary, or a rerun of this command, completes it.',
                         ', '.join(elsewhere))


def _describe_classes(config: ml_collections.ConfigDict) -> int:
  """The data set's class count, read from tfds metadata (no data needed), else 1000/10."""
  try:
    from resnet_jax.data import builders  # pylint: disable=g-import-not-at-top
    return builders.num_classes(builders.get_builder(config.data, prepare=False))
  except Exception:  # pylint: disable=broad-except  (describe must work without tfds data)
    return 1000 if config.data.image_size >= 128 else 10
