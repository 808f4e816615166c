"""The training batches, read with grain from a tfds data source.

The global example stream is grain's index shuffle of the train split, drawn
anew each epoch from (seed, epoch); epoch e covers stream positions
[e * E, (e + 1) * E) with E = steps_per_epoch * batch_size, so every epoch
trains on distinct examples. Global batch s is positions [s * B, (s + 1) * B),
and each example's crop comes from a generator seeded by (seed, position).
A batch is therefore a pure function of (seed, s), whatever the number of
devices, hosts or workers: a host reads its rows of it (`Input.host_rows`),
and a run resumed at step s starts reading there (random access: nothing
before it is read).
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from resnet_jax.data import host_preprocess
from resnet_jax.data import inputs
from resnet_jax.data import loading
from resnet_jax.data import sources


def train_dataset(data_config: Any, inp: inputs.Input, *, seed: int, start_step: int = 0,
                  num_steps: int | None = None) -> grain.MapDataset:
  """This host's batches of global steps start_step, start_step + 1, ... (num_steps of
  them; None: practically forever), as a grain MapDataset of {'image', 'label'}."""
  source = sources.open_source(inp.builder, inp.splits.train)
  preprocess = host_preprocess.train_preprocess(data_config)
  order = grain.MapDataset.range(len(source)).shuffle(
      seed=inputs.derive_seed(seed, 'order')).repeat()
  num_total, batch_size = len(source), inp.batch_size
  per_epoch = inp.steps_per_epoch * batch_size
  row_start, local = inp.host_rows[0], inp.local_batch_size
  crop_seed = inputs.derive_seed(seed, 'crop')

  def batch(step: int) -> dict[str, np.ndarray]:
    positions = step * batch_size + row_start + np.arange(local)  # in the global stream
    epochs, offsets = np.divmod(positions, per_epoch)
    indices = [order[int(e) * num_total + int(o)] for e, o in zip(epochs, offsets)]
    images, labels = None, np.empty(local, np.int32)
    for row, (position, index) in enumerate(zip(positions, indices)):
      rng = np.random.default_rng([crop_seed, int(position)])
      image, labels[row] = source.transformed(index, lambda im, rng=rng: preprocess(im, rng))
      if images is None:
        images = np.empty((local,) + image.shape, image.dtype)
      images[row] = image
    return {'image': images, 'label': labels}

  stop = start_step + num_steps if num_steps is not None else 2**62
  # One grain element per batch, filled in place: grain's per-element machinery and the
  # stacking copy cost 8% of an image (docs/performance.md). Records are read one by one:
  # array_record's batched read (__getitems__) took 40-50 us more per record on a core.
  return grain.MapDataset.range(start_step, stop).map(batch)


def train_iterator(data_config: Any, inp: inputs.Input, *, seed: int, start_step: int = 0,
                   num_steps: int | None = None) -> loading.Batches:
  """This host's training batches (numpy, uint8 images) from global step `start_step` on;
  close() it to stop grain's workers early."""
  return loading.Batches(train_dataset(data_config, inp, seed=seed, start_step=start_step,
                                       num_steps=num_steps), data_config)
