"""Checkpoint save and restore times of full train states (orbax, local disk).

    python benchmarks/checkpoint.py [--models resnet20,resnet50] [--dir /tmp/ckpt_bench]

For each model: the size of its train state (params, BN statistics, momentum),
the time a training step is blocked by the asynchronous save, the time until
the save is complete on disk, and the time to restore it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(model_name: str, directory: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  from resnet_jax import assembly, checkpointing, models  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.model.name = model_name
  image = 224 if model_name in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
                                'plain18', 'plain34', 'vgg19') else 32
  strategy = assembly.create_strategy(
      config, lambda axis: models.create_model_from_config(config.model, 1000, bn_axis_name=axis),
      (image, image, 3), steps_per_epoch=1, steps_total=1)
  state = strategy.init_state(jax.random.key(0))
  jax.block_until_ready(state)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  workdir = os.path.join(directory, model_name)
  shutil.rmtree(workdir, ignore_errors=True)
  ckpt = checkpointing.Checkpoints(workdir)
  start = time.perf_counter()
  ckpt.save(1, strategy.unreplicate(state), {'train_sums': None})
  blocked = time.perf_counter() - start
  ckpt.wait()
  saved = time.perf_counter() - start
  start = time.perf_counter()
  restored, _ = ckpt.restore(1, strategy.abstract_state(jax.random.key(0)))
  jax.block_until_ready(restored)
  restore = time.perf_counter() - start
  ckpt.close()
  shutil.rmtree(workdir, ignore_errors=True)
  return {'model': model_name, 'mb': size / 2**20, 'blocked_s': blocked, 'saved_s': saved,
          'restore_s': restore}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='resnet20,resnet56,resnet50')
  parser.add_argument('--dir', default='/tmp/resnet_jax_checkpoint_bench')
  args = parser.parse_args()
  print(f'$ python {" ".join(sys.argv)}')
  print(f'{"model":10} {"state MB":>9} {"step blocked s":>15} {"saved s":>8} {"restore s":>10}')
  for name in args.models.split(','):
    r = measure(name, args.dir)
    print(f'{r["model"]:10} {r["mb"]:9.1f} {r["blocked_s"]:15.3f} {r["saved_s"]:8.3f} '
          f'{r["restore_s"]:10.3f}', flush=True)


if __name__ == '__main__':
  main()
