"""The paper's CIFAR-10 depth study (Table 6, Fig. 6): plain and residual nets of 20-110 layers.

    python run.py --mode=sweep --config=configs/sweeps/cifar10_depth.py --workdir=DIR
    python run.py --mode=report --workdir=DIR

Each member uses configs/cifar10.py's recipe: 64k iterations at batch 128, lr
0.1 divided by 10 at 32k and 48k, the ResNet-110 warm-up, BN statistics over
64 images. The paper's test errors (Table 6): ResNet-20 8.75%, 32 7.51%,
44 7.17%, 56 6.97%, 110 6.43% (best of 5 runs; mean 6.61 +- 0.16); its
Fig. 6 shows plain-56 above plain-44 above plain-32 above plain-20.
"""
from configs import cifar10

NETS = ('plain20', 'plain32', 'plain44', 'plain56', 'resnet20', 'resnet32', 'resnet44',
        'resnet56', 'resnet110')


def get_config():
  return cifar10.get_config('resnet20')


def get_sweep():
  # The ResNet-110 warm-up is part of the recipe of that net only.
  return {name: {'model.name': name, 'schedule.warmup_lr': 0.01 if name.endswith('110') else 0.0}
          for name in NETS}
