"""Paper-style figures for a sweep: error curves (Figs. 4 and 6), layer responses (Fig. 7) and
the backward signal through the layers (Sec. 4.2's argument that plain nets do not fail by
vanishing gradients).

`python run.py --mode=report --workdir=SWEEP_DIR` reads every member's
metrics.jsonl and checkpoints and writes, beside the sweep's summary:
- `curves.png`: training error (thin, dashed) and test error (bold) against
  iterations, plain nets on the left and residual nets on the right;
- `layer_responses.png`: for each member's last checkpoint, the std of every
  3x3 layer's response (its BN output, before the addition and the ReLU) on
  a fixed batch of eval images, in layer order and sorted by magnitude, with
  the running statistics (eval mode, as Fig. 7; solid) and with the batch's
  own (train mode; dotted);
- `layer_gradients.png`: the norm of the gradient of the training loss with
  respect to each 3x3 layer's output, at initialisation and at the last
  checkpoint, and of each 3x3 kernel;
- `layer_analysis.json`: those figures (resnet_jax/analysis.py);
- `summary.md` / `summary.csv` (refreshed, with the steps each net took to
  reach 50%, 25% and 15% running training error).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from etils import epath

from resnet_jax import analysis
from resnet_jax import assembly
from resnet_jax import checkpointing
from resnet_jax import config_lib
from resnet_jax import errors
from resnet_jax import paths
from resnet_jax import sweep
from resnet_jax.data import eval_stream

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


def analyse_member(config: Any, run: assembly.Setup, workdir: Any,
                   max_examples: int = 256) -> dict[str, dict[str, list[float]]]:
  """Per-layer responses and gradient norms (analysis.py) at initialisation and at the last
  checkpoint, on the first `max_examples` images of the eval split."""
  # One view per image (the centre crop), whatever the run evaluated with.
  batch = eval_stream.eval_dataset(config.data, run.inp, crop='center')[0]
  keep = batch['mask'].astype(bool)
  count = min(int(keep.sum()), max_examples)
  group = config.model.get('bn_group_size') or 0
  count -= count % group if group and count >= group else 0  # whole BN groups in train mode
  images = np.asarray(run.augment.eval(batch['image'][keep][:count]))
  labels = batch['label'][keep][:count]
  from resnet_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model_from_config(config.model, run.inp.num_classes)
  rng = jax.random.key(config.seed)
  ckpt = checkpointing.Checkpoints(workdir)
  final, _ = ckpt.restore(ckpt.resolve('latest'), run.strategy.abstract_state(rng))
  ckpt.close()
  initial = run.strategy.to_host(run.strategy.init_state(rng))  # the run's own start
  variables = lambda state: {'params': state.params, 'batch_stats': state.batch_stats}
  return {when: analysis.analyse(model, variables(jax.device_get(state)), images, labels)
          for when, state in (('init', initial), ('final', final))}


def plot_responses(analyses: dict[str, Any], path: epath.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
  for i, (name, result) in enumerate(sorted(analyses.items())):
    final = result['final']
    for key, style, label in (('response_std_eval', '-', name),
                              ('response_std_train', ':', None)):
      stds = final[key]
      top.plot(range(1, len(stds) + 1), stds, style, color=f'C{i}', label=label)
      bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), style, color=f'C{i}')
  top.set_xlabel('layer index (original); solid: running statistics (eval), dotted: batch (train)')
  bottom.set_xlabel('layer index (sorted by magnitude)')
  for ax in (top, bottom):
    ax.set_ylabel('std')
    ax.grid(alpha=0.3)
  top.legend(fontsize=7)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)


def plot_gradients(analyses: dict[str, Any], path: epath.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
  for i, (name, result) in enumerate(sorted(analyses.items())):
    for when, style in (('init', ':'), ('final', '-')):
      for ax, key in ((top, 'output_gradient_norm'), (bottom, 'kernel_gradient_norm')):
        norms = result[when][key]
        ax.semilogy(range(1, len(norms) + 1), norms, style, color=f'C{i}',
                    label=f'{name} ({when})')
  top.set_ylabel('|dL/d output|')
  bottom.set_ylabel('|dL/d kernel|')
  bottom.set_xlabel('3x3 layer index (dotted: at initialisation, solid: last checkpoint)')
  for ax in (top, bottom):
    ax.grid(alpha=0.3)
  top.legend(fontsize=6, ncol=2)
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
  rows, analyses = [], {}
  for name in names:
    member_dir = sweep_dir / name
    config = config_lib.load_saved_config(member_dir, default, overrides)
    run = assembly.setup(config)
    steps_total = run.steps_total
    results = sweep.final_results(member_dir)
    status = sweep.member_status(member_dir)  # running: another process trains it now
    if status in ('unfinished', 'pending') and results['steps'] >= steps_total:
      status = 'finished'  # (trained before sweeps marked their members DONE)
    rows.append({'member': name, 'model': config.model.name, 'status': status, **results})
    if (member_dir / 'checkpoints').is_dir():
      analyses[name] = analyse_member(config, run, member_dir)
  if writer:
    sweep.write_summary(sweep_dir, rows)
  written = ['curves.png', 'summary.md', 'summary.csv']
  if analyses:
    if writer:
      paths.write_json(sweep_dir / 'layer_analysis.json', analyses)
      plot_responses(analyses, sweep_dir / 'layer_responses.png')
      plot_gradients(analyses, sweep_dir / 'layer_gradients.png')
    written += ['layer_responses.png', 'layer_gradients.png', 'layer_analysis.json']
  return {'sweep_dir': str(sweep_dir), 'members': names, 'written': written}
