"""Config helpers shared by the entry points (cli, sweep, report): overrides and saved configs.

Below all three, so none of them imports another for these.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from absl import logging

from resnet_jax import errors
from resnet_jax import paths

# Fields of earlier versions that config.json files may still hold: dropped on
# load (the CPU speed-ups they named now come from config.cpu_kernels; the tf.data
# pipeline's cache and shuffle buffer went with it: grain reads with random access).
RETIRED_FIELDS = ('model.materialize_blocks', 'model.pad_narrow_convs', 'model.onednn_convs',
                  'model.onednn_kernel_grads', 'data.cache', 'data.shuffle_buffer',
                  'data.ram_budget_gb')
# What a run recorded about the machine it ran on: informative, never re-applied.
MACHINE_FIELDS = ('cpu_kernels_used',)


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets an existing field, e.g. 'model.name'; a field that does not exist is an error."""
  *parents, leaf = dotted.split('.')
  node = config
  for key in parents:
    node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise errors.ConfigError(f'{dotted!r}: the config has no such field.')
  node[leaf] = value


def load_saved_config(workdir: Any, default: ml_collections.ConfigDict,
                      overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (written at train time) with command-line overrides applied."""
  path = paths.workdir_path(workdir) / 'config.json'
  if not path.exists():
    raise errors.ConfigError(f'{path} does not exist: pass --config=... (the config the '
                             'checkpoint was trained with), or train in this workdir first.')
  saved = paths.read_json(path)
  if saved.get('cpu_kernels') != 'off':  # 'on' or 'auto': decided afresh on this machine
    saved.pop('cpu_kernels', None)
  for dotted in RETIRED_FIELDS + MACHINE_FIELDS:
    *parents, leaf = dotted.split('.')
    node = saved
    for key in parents:
      node = node.get(key, {})
    if node.pop(leaf, None) not in (None, 'auto') and dotted in RETIRED_FIELDS:
      logging.info('%s: ignoring %s, which this version no longer has.', path, dotted)
  config = default.unlock()
  _update(config, saved)
  for key, value in overrides.items():
    set_field(config, key, value)
  return config.lock()


def _update(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
  for key, value in values.items():
    if isinstance(value, dict):
      if key not in config:
        config[key] = ml_collections.ConfigDict()
      _update(config[key], value)
    else:
      current = config.get(key) if key in config else None
      config[key] = tuple(value) if isinstance(value, list) and (
          current is None or isinstance(current, tuple)) else value
