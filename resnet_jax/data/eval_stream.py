"""Evaluation batches: every example of a split exactly once over all hosts.

Host h of H reads its contiguous part of the split and pads it with masked
examples (`mask` False, zero images) to exactly `Input.eval_steps` batches,
so that every host runs the same number of steps.
"""
from __future__ import annotations

from typing import Any, Iterator

import grain
import jax
import numpy as np

from resnet_jax.data import host_preprocess
from resnet_jax.data import inputs
from resnet_jax.data import loading
from resnet_jax.data import sources


def eval_dataset(data_config: Any, inp: inputs.Input, split: str | None = None,
                 crop: str | None = None) -> grain.MapDataset:
  """This host's batches of `split` (default: the eval split) with `crop` (default:
  config.data.eval_crop): {'image' or 'scales', 'label', 'mask'}."""
  crop = crop or data_config.eval_crop
  host_preprocess.check_eval_crop(data_config, crop=crop)
  source = sources.open_source(inp.builder, split or inp.splits.eval)
  start, stop = sources.part_of_split(len(source), inp.process_index, inp.process_count)
  preprocess = host_preprocess.eval_preprocess(data_config, crop)
  padding = jax.tree.map(lambda shape: np.zeros(shape, bool if len(shape) == 2 else np.uint8),
                         host_preprocess.eval_shapes(data_config, crop),
                         is_leaf=lambda x: isinstance(x, tuple))

  def example(index: int) -> dict[str, Any]:
    if index >= stop:
      return {**padding, 'label': np.int32(0), 'mask': np.bool_(False)}
    out, label = source.transformed(index, preprocess)
    return {**out, 'label': np.int32(label), 'mask': np.bool_(True)}

  size = inp.local_eval_batch_size

  def batch(step: int) -> dict[str, Any]:
    examples = [example(i) for i in range(start + step * size, start + (step + 1) * size)]
    return jax.tree.map(lambda *rows: np.stack(rows), *examples)

  # One grain element per batch, as in train_stream.
  return grain.MapDataset.range(inp.eval_steps).map(batch)


def eval_batches(data_config: Any, inp: inputs.Input, split: str | None = None,
                 crop: str | None = None) -> Iterator[dict[str, Any]]:
  """The numpy batches of an `eval_dataset`, read with config.data's workers and threads."""
  return loading.Batches(eval_dataset(data_config, inp, split, crop), data_config)
