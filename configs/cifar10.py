"""The paper's CIFAR-10 recipe (Sec. 4.2) for every CIFAR net.

    python run.py --config=configs/cifar10.py:resnet110 --workdir=DIR
    python run.py --config=configs/cifar10.py:plain56,val --workdir=DIR   # 45k/5k split

Batch 128 (BN statistics over 64 images, as on the paper's two GPUs), lr 0.1
divided by 10 at 32k and 48k iterations, 64k iterations, weight decay 1e-4,
momentum 0.9, option A shortcuts, per-pixel mean subtraction, 4-pixel padding,
random 32x32 crops and flips. ResNet-110 (and 1202) warm up at lr 0.01 until
the training error is below 80%, then return to 0.1.
"""
from configs import default

CIFAR_NETS = ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet1202',
              'plain20', 'plain32', 'plain44', 'plain56', 'plain110')


def get_config(arg: str = 'resnet20'):
  name, *flags = arg.split(',')
  if name not in CIFAR_NETS or set(flags) - {'val'}:
    raise ValueError(f'configs/cifar10.py:{arg}: use NET or NET,val with NET one of '
                     f'{", ".join(CIFAR_NETS)}.')
  c = default.get_config()
  c.model.name = name
  c.model.bn_group_size = 64

  c.data.name = 'cifar10'
  c.data.image_size = 32
  c.data.train_augment = 'pad_crop_flip'
  c.data.normalize = 'per_pixel_mean'
  # The paper chose its schedule on a 45k/5k train/val split, then trained on all 50k.
  c.data.validation_size = 5000 if 'val' in flags else 0

  c.batch_size = 128
  c.eval_batch_size = 512
  c.num_train_steps = 64_000
  c.schedule.name = 'step'
  c.schedule.unit = 'steps'
  c.schedule.boundaries = (32_000, 48_000)
  c.schedule.factor = 0.1
  # "0.01 to warm up the training until the training error is below 80% (about
  # 400 iterations), and then go back to 0.1".
  c.schedule.warmup_lr = 0.01 if name in ('resnet110', 'resnet1202', 'plain110') else 0.0
  c.schedule.warmup_until_error = 0.8

  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 2000
  return c
