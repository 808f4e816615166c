"""The errors a user can act on; run.py prints their message without a traceback.

Anything else (a bug, a library failure) keeps its traceback. The classes also
derive from the builtin a caller would expect (ValueError for a bad config
value), so library users can catch either.
"""
from __future__ import annotations


class UserError(Exception):
  """An expected failure whose message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
  """A config value (or command-line flag) that cannot work."""


class DataError(UserError, RuntimeError):
  """A data set that is missing, cannot be downloaded or cannot be read."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that is missing, unreadable or does not fit the configured model."""


class DivergedError(UserError, FloatingPointError):
  """A non-finite loss: training stopped without saving the bad state."""


class WorkdirInUseError(UserError, RuntimeError):
  """A workdir (or a sweep member) that another live run holds the lock of."""
