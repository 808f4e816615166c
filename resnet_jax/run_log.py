"""Where a run's numbers go: TensorBoard events, metrics.jsonl and the log; the training clock.

clu 0.0.12's `metric_writers` package imports TensorFlow when it is imported
(its summary writer), and training hosts have none, so the writers here keep
clu's MetricWriter methods (write_scalars, write_hparams, flush, close) and
write TensorBoard events with tensorboardX, which needs neither TensorFlow nor
torch and writes gs:// logdirs through google-cloud-storage.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Mapping

import jax
from absl import logging
from etils import epath

from resnet_jax import errors
from resnet_jax import paths


class LoggingWriter:
  """Scalars to the log, one line per call."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('Hyperparameters: %s', hparams)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter(LoggingWriter):
  """TensorBoard event files in `logdir` (local or gs://), via tensorboardX."""

  def __init__(self, logdir: str):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._writer = tensorboardX.SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), int(step))

  def write_hparams(self, hparams):
    self._writer.add_text('hparams', '\n'.join(f'    {k}: {v}' for k, v in hparams.items()), 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter(LoggingWriter):
  """Appends one JSON object per `write_scalars` call to a file: {'step': ..., **scalars}.

  On resume, lines past the checkpoint are dropped, since the resumed run writes
  them again. A gs:// object cannot be appended to (and becomes visible only when
  written whole), so there the file is rewritten whole at each call: it stays
  small (a line per logged step) and readable during the run.
  """

  def __init__(self, path: epath.Path, resume_step: int | None = None,
               eval_pending: bool = False):
    self.path = path
    kept = []
    if resume_step is not None and path.exists():
      def keep(line: dict[str, Any]) -> bool:
        if eval_pending and line['step'] == resume_step:  # it is evaluated again
          return not any(key.startswith('eval_') for key in line)
        return line['step'] <= resume_step
      kept = [json.dumps(line) + '\n' for line in read_metrics(path) if keep(line)]
    self._lines = kept if paths.is_remote(path) else None
    if kept or path.exists():  # rewritten whole, then renamed: a crash leaves the old file
      temporary = path.with_name(f'{path.name}.tmp')
      temporary.write_text(''.join(kept))
      temporary.replace(path)
    self._file = None if self._lines is not None else open(path, 'a')  # pylint: disable=consider-using-with

  def write_scalars(self, step, scalars):
    line = json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n'
    if self._lines is None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self.path.write_text(''.join(self._lines))

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()


def read_metrics(path: epath.Path) -> list[dict[str, Any]]:
  """metrics.jsonl's records. A torn last line (a crash in the middle of writing it) is
  dropped with a warning; an unreadable line before it is an error naming the line."""
  lines = [line for line in path.read_bytes().decode('utf-8', 'replace').splitlines() if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get('step'), int):
        raise ValueError('not a {"step": ..., ...} record')
    except ValueError as e:
      if number == len(lines):
        logging.warning('%s: dropped its torn last line (%s): %r', path, e, line[:200])
        break
      raise errors.UserError(
          f'{path}, line {number}, is not a metrics record ({e}): {line[:200]!r}. Fix or '
          'delete that line and rerun the same command.') from e
    records.append(record)
  return records


class MultiWriter(LoggingWriter):
  def __init__(self, writers: list[LoggingWriter]):
    self._writers = writers

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams):
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def create_writer(workdir: epath.Path, resume_step: int | None,
                  eval_pending: bool = False) -> LoggingWriter:
  """TensorBoard + logging + metrics.jsonl on the first host; logging elsewhere."""
  if jax.process_index() > 0:
    return LoggingWriter()
  jsonl = JsonlWriter(workdir / 'metrics.jsonl', resume_step, eval_pending)  # checks it first
  return MultiWriter([LoggingWriter(), TensorBoardWriter(str(workdir)), jsonl])


class TrainClock:
  """Wall time spent training: evaluation and checkpoint saves are left out.

  Steps run asynchronously, so a paused section first waits for the steps in
  flight (they are training time).
  """

  def __init__(self, step: int):
    self._start = time.monotonic()
    self._paused = 0.0
    self._last = (0.0, step)  # (training seconds, step) at the last reading

  @contextlib.contextmanager
  def paused(self, in_flight: Any):
    jax.block_until_ready(in_flight)
    start = time.monotonic()
    try:
      yield
    finally:
      self._paused += time.monotonic() - start

  def images_per_sec(self, step: int, batch_size: int) -> float:
    """Images per second of training since the last call."""
    seconds = time.monotonic() - self._start - self._paused
    last_seconds, last_step = self._last
    self._last = (seconds, step)
    return batch_size * (step - last_step) / max(seconds - last_seconds, 1e-9)


class Progress:
  """Every `every` steps: steps per second (to the writer) and the time left (to the log)."""

  def __init__(self, writer: LoggingWriter, total_steps: int, every: int, step: int):
    self._writer, self._total, self._every = writer, total_steps, max(every, 1)
    self._last = (time.monotonic(), step)

  def __call__(self, step: int) -> None:
    if step % self._every and step != self._total:
      return
    now = time.monotonic()
    rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
    self._last = (now, step)
    left = (self._total - step) / rate / 60 if rate else float('inf')
    self._writer.write_scalars(step, {'steps_per_sec': rate})
    logging.info('Step %d of %d: %.2f steps/s, %.1f min left.', step, self._total, rate, left)
