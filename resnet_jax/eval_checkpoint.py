"""Evaluation from a checkpoint, on whatever devices are present."""
from __future__ import annotations

from typing import Any

import jax

from resnet_jax import assembly
from resnet_jax import checkpointing
from resnet_jax import evaluation
from resnet_jax import paths
from resnet_jax.data import eval_stream


def evaluate_checkpoint(config: Any, workdir: str, which: str = 'latest') -> dict[str, Any]:
  """Restores `which` (latest, best or a step), evaluates the configured split and writes
  WORKDIR/eval_results.json. In a workdir without checkpoints, config.init_from's
  weights (torchvision's) are evaluated instead."""
  run = assembly.setup(config)
  inp, strategy = run.inp, run.strategy
  ckpt = checkpointing.Checkpoints(workdir)
  try:
    if not ckpt.steps() and config.init_from:
      step, which = 0, config.init_from
      state = assembly.initial_state(strategy, config, evaluating=True)
    else:
      step = ckpt.resolve(which)
      state, _ = ckpt.restore(step, strategy.abstract_state(jax.random.key(config.seed)))
      state = strategy.replicate(state)
  finally:
    ckpt.close()
  metrics = evaluation.evaluate(strategy, state, eval_stream.eval_batches(config.data, inp))
  result = {
      'step': step,
      'checkpoint': which,
      'split': inp.splits.eval,
      'eval_crop': config.data.eval_crop,
      'top1_error': metrics['eval_top1_error'],
      'top5_error': metrics['eval_top5_error'],
      'loss': metrics['eval_loss'],
      'num_examples': int(metrics['eval_num_examples']),
      'num_devices': jax.device_count(),
  }
  if jax.process_index() == 0:
    paths.write_json(paths.workdir_path(workdir) / 'eval_results.json', result)
  return result
