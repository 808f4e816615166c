"""The paper's degradation study (Fig. 6, Table 6) on real Fashion-MNIST, sized for CPUs.

    python run.py --mode=sweep --config=configs/sweeps/fashion_mnist_depth.py --workdir=DIR
    python run.py --mode=report --workdir=DIR

plain20, plain56, resnet20 and resnet56 with the paper's CIFAR-10 recipe
(batch 128, SGD 0.1 with momentum 0.9 and weight decay 1e-4, divided by 10 at
50% and 75% of training, option A shortcuts, per-pixel mean, 4-pixel padding,
crops and flips), on the 60k/10k Fashion-MNIST split (28x28 grey, resized to
32x32, repeated to 3 channels), for 3 epochs instead of 182.
On machines without internet, prepare the data first:
python ../shared/tools/prepare_fashion_mnist.py DATA_DIR, then add
--config.data.data_dir=DATA_DIR.
"""
from configs import cifar10


def get_config():
  c = cifar10.get_config('resnet20')
  c.model.bn_group_size = 0          # statistics over the batch of 128
  c.data.name = 'fashion_mnist'
  c.num_train_steps = -1
  c.num_epochs = 3.0
  c.schedule.unit = 'epochs'
  c.schedule.boundaries = (1.5, 2.25)
  c.schedule.warmup_lr = 0.0
  c.log_every_steps = 26
  c.eval_every_steps = 156           # a third of an epoch (468 steps)
  c.checkpoint_every_steps = 156
  return c


def get_sweep():
  return [{'model.name': name} for name in ('plain20', 'plain56', 'resnet20', 'resnet56')]
