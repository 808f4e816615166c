"""--mode=export: one file from the eval pipeline's uint8 images to logits, needing only jax."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from resnet_jax import backend
from resnet_jax import checkpointing
from resnet_jax import config_lib
from resnet_jax import errors
from resnet_jax import export
from resnet_jax import models
from resnet_jax import train
from resnet_jax.data import eval_stream
from tests.support import helpers

# The process that loads an export cannot import these: the file must carry the network,
# its weights and the normalisation (the per-pixel mean lives in the tfds data_dir).
BLOCK = ('import sys\n'
         'class Block:\n'
         '  def find_spec(self, name, path=None, target=None):\n'
         '    if name.split(".")[0] in ("resnet_jax", "tensorflow_datasets", "tensorflow"):\n'
         '      raise ImportError("not where the export is used: " + name)\n'
         'sys.meta_path.insert(0, Block())\n')

# argv: images.npy, then exported files; prints {file: logits} as JSON.
CALL_EXPORTS = BLOCK + """
import json
import jax
import numpy as np
images = np.load(sys.argv[1])
logits = {}
for path in sys.argv[2:]:
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  logits[path] = np.asarray(exported.call(images), np.float64).tolist()
blocked = sorted(m for m in sys.modules if m.split('.')[0] in ('resnet_jax', 'tensorflow_datasets',
                                                               'tensorflow'))
assert not blocked, blocked
print(json.dumps(logits))
"""


def call_in_bare_process(images, files, tmp_path):
  """{file: float32 logits} from a process where only jax and numpy can be imported."""
  np.save(tmp_path / 'images.npy', images)
  result = subprocess.run(
      [sys.executable, '-c', CALL_EXPORTS, str(tmp_path / 'images.npy'), *map(str, files)],
      capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return {path: np.asarray(logits, np.float32)
          for path, logits in json.loads(result.stdout.splitlines()[-1]).items()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_dir):
  """ResNet-20 after 2 steps on the digits (default config: data.normalize=per_pixel_mean),
  exported by run.py as a user would; (workdir, the printed info)."""
  workdir = tmp_path_factory.mktemp('export')
  helpers.run_py(f'--workdir={workdir}', f'--config.data.data_dir={digits_dir}',
                 '--config.num_train_steps=2', '--config.batch_size=16',
                 '--config.eval_batch_size=120', '--config.log_every_steps=1',
                 '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2')
  out = helpers.run_py('--mode=export', f'--workdir={workdir}').stdout
  return workdir, json.loads(out[out.index('{'):])


def trainer_logits(workdir, images, **overrides):
  """What --mode=eval's model gives for uint8 `images`: the trainer's own eval normalisation
  (train.setup's augment), then the restored network; and that normalisation."""
  config = config_lib.load_saved_config(workdir, default.get_config(), overrides)
  run = train.setup(config)
  ckpt = checkpointing.Checkpoints(workdir)
  params, batch_stats = ckpt.restore_variables(ckpt.resolve('latest'))
  ckpt.close()
  model = models.create_model_from_config(config.model, run.inp.num_classes,
                                          **backend.model_defaults(config.model))
  variables = {'params': params, 'batch_stats': batch_stats}
  return np.asarray(model.apply(variables, run.augment.eval(images), train=False)), run.augment


def eval_images(workdir, count):
  """The first `count` uint8 images of the eval pipeline (centre crops at image_size)."""
  config = config_lib.load_saved_config(workdir, default.get_config(), {})
  return np.asarray(eval_stream.eval_dataset(config.data, train.setup(config).inp)[0]['image'])[
      :count]


def test_export_takes_uint8_images_and_needs_only_jax(trained, tmp_path):
  workdir, info = trained
  assert info['file'].endswith('export/resnet20_step2.jax_exported')
  assert info['input'].startswith('uint8 (batch, 32, 32, 3)')
  assert info['normalize'] == 'per_pixel_mean' and info['normalization_included'] is True
  with open(info['file'].replace('.jax_exported', '.json')) as f:
    assert json.load(f) == info
  exported = export.load(info['file'])
  assert [str(a.dtype) for a in exported.in_avals] == ['uint8']
  assert str(exported.in_avals[0].shape[0]) == 'batch'  # any batch size
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  calls = set(re.findall(r'custom_call @(\w+)', exported.mlir_module()))
  assert calls <= {'shape_assertion'}, calls  # plain lax: no CPU plugin inside
  with pytest.raises(ValueError):  # normalised float images are no longer its input
    exported.call(np.zeros((1, 32, 32, 3), np.float32))

  # Real digits and noise over the whole uint8 range, in batches of 7 and 1.
  noise = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  images = np.concatenate([eval_images(workdir, 5), noise])
  moved = tmp_path / 'elsewhere.jax_exported'  # beside nothing of the run
  shutil.copy(info['file'], moved)
  got = call_in_bare_process(images, [moved], tmp_path)[str(moved)]
  want, _ = trainer_logits(workdir, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(exported.call(images[:1]), want[:1], rtol=1e-5, atol=1e-5)


def test_the_per_pixel_mean_and_the_imagenet_statistics_are_inside(trained, tmp_path):
  """The digits' mean image is far from constant (dark borders, bright strokes), so using the
  per-channel mean instead, or no mean, would change the logits; the ImageNet mean and std
  (another config of the same checkpoint) are baked in too."""
  workdir, info = trained
  images = eval_images(workdir, 6)
  want, augment = trainer_logits(workdir, images)
  mean = np.asarray(augment.mean)
  assert mean.shape == (32, 32, 3) and np.ptp(mean) > 0.3, np.ptp(mean)

  config = config_lib.load_saved_config(workdir, default.get_config(),
                                        {'data.normalize': 'imagenet_mean_std'})
  ckpt = checkpointing.Checkpoints(workdir)
  params, batch_stats = ckpt.restore_variables(ckpt.resolve('latest'))
  ckpt.close()
  exported = export.inference_function(config.model, config.data.image_size,
                                       {'params': params, 'batch_stats': batch_stats},
                                       export.eval_normalization(config.data))
  imagenet = tmp_path / 'imagenet_mean_std.jax_exported'
  imagenet.write_bytes(exported.serialize())
  got = call_in_bare_process(images, [info['file'], imagenet], tmp_path)
  np.testing.assert_allclose(got[info['file']], want, rtol=1e-5, atol=1e-5)
  want_imagenet, _ = trainer_logits(workdir, images, **{'data.normalize': 'imagenet_mean_std'})
  np.testing.assert_allclose(got[str(imagenet)], want_imagenet, rtol=1e-5, atol=1e-5)

  # The same network on other normalisations: clearly other logits.
  per_channel = type(augment)(mean=mean.mean(axis=(0, 1)))
  model = models.create_model_from_config(config.model, 10, **backend.model_defaults(config.model))
  variables = {'params': params, 'batch_stats': batch_stats}
  for other in (want_imagenet, model.apply(variables, per_channel.eval(images), train=False)):
    assert np.abs(np.asarray(other) - got[info['file']]).max() > 1e-2


def test_export_of_an_unknown_normalisation_says_what_to_choose(trained):
  config = config_lib.load_saved_config(trained[0], default.get_config(),
                                        {'data.normalize': 'per_image'})
  with pytest.raises(errors.ConfigError, match="normalize='per_image'; choose one of"):
    export.export_checkpoint(config, str(trained[0]))

