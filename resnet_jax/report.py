"""Paper-style figures for a sweep: error curves (Figs. 4 and 6) and layer responses (Fig. 7).

`python run.py --mode=report --workdir=SWEEP_DIR` reads every member's
metrics.jsonl and writes, beside the sweep's summary:
- `curves.png`: training error (thin, dashed) and test error (bold) against
  iterations, plain nets on the left and residual nets on the right;
- `layer_responses.png` and `layer_responses.json`: for each member's final
  checkpoint, the standard deviation of every 3x3 layer's response (the BN
  output, before the addition and the ReLU) on eval data, in layer order and
  sorted by magnitude;
- `summary.md` / `summary.csv` (refreshed).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from resnet_jax import checkpointing
from resnet_jax import config_lib
from resnet_jax import errors
from resnet_jax import input_pipeline
from resnet_jax import paths
from resnet_jax import sweep
from resnet_jax import train

# The BN layers that follow a 3x3 conv (not the 1x1 projections or the 7x7 stem).
_RESPONSE_LAYER = re.compile(r'^(stem_bn|stage\d+_block\d+/bn[12])$')


def members(sweep_dir: epath.Path) -> list[str]:
  if not sweep_dir.is_dir():
    return []
  return sorted(d.name for d in sweep_dir.iterdir() if (d / 'metrics.jsonl').exists())


def plot_curves(sweep_dir: epath.Path, names: list[str], path: epath.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = {'plain': [n for n in names if n.startswith('plain')],
            'residual': [n for n in names if not n.startswith('plain')]}
  panels = [(title, group) for title, group in groups.items() if group]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), sharey=True,
                           squeeze=False)
  for ax, (title, group) in zip(axes[0], panels):
    for i, name in enumerate(group):
      lines = sweep.read_metrics(sweep_dir / name)
      color = f'C{i}'
      train = [(l['step'], l['train_top1_error']) for l in lines if 'train_top1_error' in l]
      test = [(l['step'], l['eval_top1_error']) for l in lines if 'eval_top1_error' in l]
      if train:
        ax.plot(*zip(*train), '--', color=color, linewidth=0.8, alpha=0.8)
      if test:
        ax.plot(*zip(*test), '-', color=color, linewidth=2.2, label=name)
    ax.set_title(f'{title} nets' if title == 'plain' else 'ResNets')
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0][0].set_ylabel('error (dashed: training, bold: test)')
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)


def layer_response_stds(config: Any, run: train.Setup, workdir: Any,
                        max_examples: int = 1000) -> list[float]:
  """Std of each 3x3 layer's BN output over eval data (per channel, averaged over channels)."""
  ckpt = checkpointing.Checkpoints(workdir)
  state, _ = ckpt.restore(ckpt.resolve('latest'), run.strategy.abstract_state(
      jax.random.key(config.seed)))
  ckpt.close()
  from resnet_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model_from_config(config.model, run.inp.num_classes)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  @jax.jit
  def responses(images):
    _, captured = model.apply(
        variables, images, train=False, capture_intermediates=lambda m, _: isinstance(
            m, models.BatchNorm), mutable=['intermediates'])
    flat = jax.tree_util.tree_flatten_with_path(captured['intermediates'])[0]
    out = {}
    for path, value in flat:
      name = '/'.join(p.key for p in path[:-1] if hasattr(p, 'key'))
      name = name.removesuffix('/__call__')
      if _RESPONSE_LAYER.match(name):
        out[name] = value  # (batch, H, W, C)
    return out

  sums: dict[str, Any] = {}
  seen = 0
  for batch in tfds.as_numpy(input_pipeline.eval_dataset(config, run.inp)):
    keep = batch['mask'].astype(bool)
    if not keep.any():
      continue
    acts = responses(run.augment.eval(jnp.asarray(batch['image'][keep])))
    for name, value in acts.items():
      x = np.asarray(value, np.float64)
      s = sums.setdefault(name, [0.0, 0.0, 0])
      s[0] = s[0] + x.sum(axis=(0, 1, 2))
      s[1] = s[1] + (x ** 2).sum(axis=(0, 1, 2))
      s[2] += x.shape[0] * x.shape[1] * x.shape[2]
    seen += int(keep.sum())
    if seen >= max_examples:
      break
  order = sorted(sums, key=_layer_order)
  stds = []
  for name in order:
    total, total_sq, count = sums[name]
    mean = total / count
    stds.append(float(np.sqrt(np.maximum(total_sq / count - mean ** 2, 0)).mean()))
  return stds


def _layer_order(name: str) -> tuple[int, int, int]:
  if name == 'stem_bn':
    return (0, 0, 0)
  stage, block, bn = map(int, re.findall(r'\d+', name))
  return (stage, block, bn)


def plot_responses(responses: dict[str, list[float]], path: epath.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
  for i, (name, stds) in enumerate(sorted(responses.items())):
    style = '--' if name.startswith('plain') else '-'
    top.plot(range(1, len(stds) + 1), stds, style, color=f'C{i}', label=name)
    bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), style, color=f'C{i}',
                label=name)
  top.set_xlabel('layer index (original)')
  bottom.set_xlabel('layer index (sorted by magnitude)')
  for ax in (top, bottom):
    ax.set_ylabel('std')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)


def report(sweep_dir: str, default: Any, overrides: dict[str, Any]) -> dict[str, Any]:
  """Writes the figures and the refreshed summary; returns what it wrote.

  Each member's config is its saved WORKDIR/config.json with `overrides` applied.
  """
  sweep_dir = paths.workdir_path(sweep_dir)
  names = members(sweep_dir)
  if not names:
    raise errors.ConfigError(f'{sweep_dir} has no member directories with metrics.jsonl: run '
                     '--mode=sweep (or point --workdir at a sweep directory).')
  writer = jax.process_index() == 0  # on several hosts, one writes
  if writer:
    plot_curves(sweep_dir, names, sweep_dir / 'curves.png')
  rows, responses = [], {}
  for name in names:
    member_dir = sweep_dir / name
    config = config_lib.load_saved_config(member_dir, default, overrides)
    run = train.setup(config)
    steps_total = run.steps_total
    results = sweep.final_results(member_dir)
    rows.append({'member': name, 'model': config.model.name,
                 'status': 'finished' if results['steps'] >= steps_total else 'unfinished',
                 **results})
    if (member_dir / 'checkpoints').is_dir():
      responses[name] = layer_response_stds(config, run, member_dir)
  if writer:
    sweep.write_summary(sweep_dir, rows)
  written = ['curves.png', 'summary.md', 'summary.csv']
  if responses:
    if writer:
      paths.write_json(sweep_dir / 'layer_responses.json', responses)
      plot_responses(responses, sweep_dir / 'layer_responses.png')
    written += ['layer_responses.png', 'layer_responses.json']
  return {'sweep_dir': str(sweep_dir), 'members': names, 'written': written}
