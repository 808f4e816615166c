"""Where a layer's eval-mode response comes from: BN running statistics against batch ones.

    python benchmarks/bn_statistics.py --workdir=RUN [--layers=stem_bn,stage1_block1/bn1]

For the latest checkpoint of a run and each 3x3 layer's BN, per channel:
the running mean and variance the eval step normalises with, and the mean
and variance of that BN's input over (a) eval images (centre crops) and (b)
augmented training batches (the run's next ones after the checkpoint), both
computed with the checkpoint's weights in eval mode up to that layer (so only
the layer's own statistics differ). It prints, per layer, the eval-mode
response std (what the report plots), the ratio of each data's variance to the
running variance (median and worst channel), and the channels behind the
largest responses. Running statistics that are right give
ratios near 1 on training batches; ratios near 1 on training batches but far
from it on eval images mean the two inputs differ, not the statistics; and
with right statistics a large response is the BN's learned scale (in train
mode each channel's response std is |scale|).
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet_jax import analysis  # pylint: disable=g-import-not-at-top
from resnet_jax import checkpointing
from resnet_jax import config_lib
from resnet_jax import models
from resnet_jax import train
from resnet_jax.data import eval_stream
from resnet_jax.data import train_stream
from configs import default

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run\'s workdir.', required=True)
_LAYERS = flags.DEFINE_list('layers', [], 'BN layers to show (default: all 3x3 layers).')
_EXAMPLES = flags.DEFINE_integer('examples', 1024, 'Images of each kind.')


def _inputs(model, variables, images):
  """Each response layer's BN input, in eval mode (the interceptor sees args)."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      name = analysis._bn_name(context.module)  # pylint: disable=protected-access
      if name is not None:
        seen[name] = args[0]
    return next_fun(*args, **kwargs)

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  return seen


def _moments(model, variables, batches):
  """Per-channel mean and variance of every response layer's input over `batches`."""
  fn = jax.jit(lambda images: {k: (jnp.mean(v, (0, 1, 2)), jnp.mean(jnp.square(v), (0, 1, 2)))
                               for k, v in _inputs(model, variables, images).items()})
  total, count = None, 0
  for images in batches:
    sums = jax.device_get(fn(images))
    sums = {k: (np.float64(m) * len(images), np.float64(s) * len(images))
            for k, (m, s) in sums.items()}
    total = sums if total is None else {k: (total[k][0] + m, total[k][1] + s)
                                        for k, (m, s) in sums.items()}
    count += len(images)
  return {k: (m / count, s / count - (m / count) ** 2) for k, (m, s) in total.items()}


def main(_):
  config = config_lib.load_saved_config(_WORKDIR.value, default.get_config(), {})
  run = train.setup(config)
  model = models.create_model_from_config(config.model, run.inp.num_classes)
  ckpt = checkpointing.Checkpoints(_WORKDIR.value)
  step = ckpt.resolve('latest')
  state, _ = ckpt.restore(step, run.strategy.abstract_state(jax.random.key(config.seed)))
  ckpt.close()
  state = jax.device_get(state)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def eval_images():
    seen = 0
    # One view per image (the centre crop), whatever the run evaluated with.
    for batch in eval_stream.eval_batches(config.data, run.inp, crop='center'):
      keep = batch['mask'].astype(bool)
      yield np.asarray(run.augment.eval(batch['image'][keep]))
      seen += int(keep.sum())
      if seen >= _EXAMPLES.value:
        return

  def train_images():
    size = config.batch_size
    count = -(-_EXAMPLES.value // size)
    batches = train_stream.train_iterator(config.data, run.inp, seed=config.seed,
                                          start_step=step, num_steps=count)
    for i, batch in enumerate(itertools.islice(batches, count)):
      yield np.asarray(run.augment.train(batch['image'], step + i, np.arange(size) + i * size))

  on_eval = _moments(model, variables, eval_images())
  on_train = _moments(model, variables, train_images())
  bn = {name: _get(state.batch_stats, name) for name in on_eval}
  scales = {name: np.asarray(_get(state.params, name)['scale']) for name in on_eval}
  eps = config.model.get('bn_epsilon') or 1e-5
  rows = []
  for name in sorted(on_eval, key=analysis.layer_order):
    if _LAYERS.value and name not in _LAYERS.value:
      continue
    run_mean, run_var = np.asarray(bn[name]['mean']), np.asarray(bn[name]['var'])
    eval_ratio = on_eval[name][1] / (run_var + eps)
    train_ratio = on_train[name][1] / (run_var + eps)
    response = np.abs(scales[name]) * np.sqrt(eval_ratio)  # eval-mode output std per channel
    worst = np.argsort(response)[::-1][:3]
    rows.append({
        'layer': name, 'eval_mode_std': float(response.mean()),
        # In train mode each channel's response std is |scale| (batch statistics).
        'mean_abs_scale': float(np.abs(scales[name]).mean()),
        'var_ratio_eval_median': float(np.median(eval_ratio)),
        'var_ratio_train_median': float(np.median(train_ratio)),
        'worst_channels': [{
            'channel': int(c), 'response_std': float(response[c]), 'scale': float(scales[name][c]),
            'running_var': float(run_var[c]), 'eval_var': float(on_eval[name][1][c]),
            'train_var': float(on_train[name][1][c]), 'running_mean': float(run_mean[c]),
            'eval_mean': float(on_eval[name][0][c]), 'train_mean': float(on_train[name][0][c]),
        } for c in worst]})
  print(json.dumps({'workdir': _WORKDIR.value, 'step': step, 'epsilon': eps, 'layers': rows},
                   indent=1))


def _get(tree, name):
  for key in name.split('/'):
    tree = tree[key]
  return tree


if __name__ == '__main__':
  app.run(main)
