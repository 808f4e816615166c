"""`run.py --mode=export`: a checkpoint as a serialized `jax.export` inference function.

The file holds the network's eval-mode forward pass (BN with its running
statistics) with the checkpoint's weights inside, for any batch size (a
symbolic batch dimension), lowered for CPUs, GPUs and TPUs from plain lax
(never the CPU plugin). Load it without resnet_jax:

    exported = jax.export.deserialize(path.read_bytes())
    logits = exported.call(images)   # float32 (batch, size, size, 3), normalised

Its input is what the model sees in --mode=eval: images preprocessed and
normalised as `config.data` says (the .json beside it repeats the settings).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax import backend
from resnet_jax import checkpointing
from resnet_jax import models
from resnet_jax import paths

PLATFORMS = ('cpu', 'cuda', 'tpu')


def inference_function(config: Any, variables: dict[str, Any]) -> jax.export.Exported:
  """The eval-mode network with `variables` baked in, for a symbolic batch size."""
  num_classes = int(variables['params']['head']['bias'].shape[0])
  model = models.create_model_from_config(config.model, num_classes,
                                          **backend.model_defaults(config.model))
  forward = jax.jit(lambda images: model.apply(variables, images, train=False))
  batch, = jax.export.symbolic_shape('batch')
  size = config.data.image_size
  return jax.export.export(forward, platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))


def export_checkpoint(config: Any, workdir: str, which: str = 'latest') -> dict[str, Any]:
  """Writes WORKDIR/export/<model>_step<S>.jax_exported (and .json); returns what it wrote.

  Needs only the checkpoint: no data set, no train state layout beyond the
  saved one. Run it on one host.
  """
  ckpt = checkpointing.Checkpoints(workdir)
  step = ckpt.resolve(which)
  params, batch_stats = ckpt.restore_variables(step)
  ckpt.close()
  exported = inference_function(config, {'params': params, 'batch_stats': batch_stats})
  directory = paths.workdir_path(workdir) / 'export'
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f'{config.model.name}_step{step}.jax_exported'
  info = {
      'file': str(path),
      'step': step,
      'checkpoint': which,
      'model': config.model.name,
      'num_classes': int(params['head']['bias'].shape[0]),
      'input': f'float32 (batch, {config.data.image_size}, {config.data.image_size}, 3)',
      'normalize': config.data.normalize,
      'platforms': list(exported.platforms),
  }
  if jax.process_index() == 0:
    path.write_bytes(exported.serialize())
    paths.write_json(path.with_suffix('.json'), info)
  return info


def load(path: str) -> jax.export.Exported:
  """An exported inference function, ready to `.call(images)`."""
  return jax.export.deserialize(bytearray(paths.workdir_path(path).read_bytes()))
