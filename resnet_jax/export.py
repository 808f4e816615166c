"""`run.py --mode=export`: a checkpoint as a serialized `jax.export` inference function.

The file holds everything between the input pipeline's uint8 images and the
logits: the normalisation of --mode=eval (config.data.normalize, its per-pixel
mean image or mean/std as constants) and the network's eval-mode forward pass
(BN with its running statistics) with the checkpoint's weights, for any batch
size (a symbolic batch dimension), lowered for CPUs, GPUs and TPUs from plain
lax (never the CPU plugin). So a user needs neither resnet_jax nor the data
set's cached statistics, only jax:

    exported = jax.export.deserialize(path.read_bytes())
    logits = exported.call(images)   # uint8 (batch, size, size, 3) RGB

Its images are what the eval pipeline sends the devices for the centre crop:
decoded, resized (and cropped) as `config.data` says (the .json beside it
repeats the settings), not yet normalised.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax import backend
from resnet_jax import checkpointing
from resnet_jax import models
from resnet_jax import paths
from resnet_jax.data import builders
from resnet_jax.data import device_augment
from resnet_jax.data import normalization

PLATFORMS = ('cpu', 'cuda', 'tpu')


def eval_normalization(data_config: Any) -> device_augment.DeviceAugment:
  """The trainer's eval normalisation for `data_config`, built as `train.setup` builds it.

  Only 'per_pixel_mean' reads the data set (its cached mean image, computed
  from the train split the first time), so the fixed ImageNet statistics export
  on a host without it.
  """
  builder, train_split = None, None
  if data_config.normalize == 'per_pixel_mean':
    builder = builders.get_builder(data_config)
    train_split = builders.get_splits(builder, data_config).train
  return normalization.device_augment(data_config, builder, train_split, seed=0)


def inference_function(model_config: Any, image_size: int, variables: dict[str, Any],
                       normalize: device_augment.DeviceAugment) -> jax.export.Exported:
  """uint8 images (image_size square) -> logits of config.model's net, with `normalize`'s
  statistics and `variables` baked in, for a symbolic batch size."""
  num_classes = int(variables['params']['head']['bias'].shape[0])
  model = models.create_model_from_config(model_config, num_classes,
                                          **backend.model_defaults(model_config))
  forward = jax.jit(
      lambda images: model.apply(variables, normalize.eval(images), train=False))
  batch, = jax.export.symbolic_shape('batch')
  return jax.export.export(forward, platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8))


def export_checkpoint(config: Any, workdir: str, which: str = 'latest') -> dict[str, Any]:
  """Writes WORKDIR/export/<model>_step<S>.jax_exported (and .json); returns what it wrote.

  Needs the checkpoint and, for data.normalize='per_pixel_mean', the data set's
  mean image (cached in its data_dir by training). Run it on one host.
  """
  ckpt = checkpointing.Checkpoints(workdir)
  step = ckpt.resolve(which)
  normalize = eval_normalization(config.data)  # before the restore, which may take a while
  params, batch_stats = ckpt.restore_variables(step)
  ckpt.close()
  exported = inference_function(config.model, config.data.image_size,
                                {'params': params, 'batch_stats': batch_stats},
                                normalize)
  directory = paths.workdir_path(workdir) / 'export'
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f'{config.model.name}_step{step}.jax_exported'
  size = config.data.image_size
  info = {
      'file': str(path),
      'step': step,
      'checkpoint': which,
      'model': config.model.name,
      'num_classes': int(params['head']['bias'].shape[0]),
      'input': f'uint8 (batch, {size}, {size}, 3) RGB, resized as for --mode=eval',
      'normalize': config.data.normalize,
      'normalization_included': True,
      'platforms': list(exported.platforms),
  }
  if jax.process_index() == 0:
    path.write_bytes(exported.serialize())
    paths.write_json(path.with_suffix('.json'), info)
  return info


def load(path: str) -> jax.export.Exported:
  """An exported inference function, ready to `.call(uint8_images)`."""
  return jax.export.deserialize(bytearray(paths.workdir_path(path).read_bytes()))
