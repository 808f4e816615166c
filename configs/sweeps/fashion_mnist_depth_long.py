"""The paper's degradation study on real Fashion-MNIST, trained long enough to converge.

    python ../shared/tools/prepare_fashion_mnist.py DATA_DIR     # offline machines only
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python run.py --mode=sweep \
        --config=configs/sweeps/fashion_mnist_depth_long.py --workdir=DIR --config.data.data_dir=DATA_DIR
    python run.py --mode=report --workdir=DIR --config.data.data_dir=DATA_DIR

The 3-epoch study (fashion_mnist_depth.py) ended with ResNet-56 still
converging above ResNet-20. Here every net trains 15 epochs (7,020 steps of
128) with the same recipe (SGD 0.1, momentum 0.9, weight decay 1e-4, divided
by 10 at 50% and 75% of training, option A, per-pixel mean, 4-pixel padding,
crops and flips): long enough that the test error of the last third of
training moves by a fraction of a point. ResNet-20 and ResNet-56 train with
two seeds each, for the spread. Members run in the order below, the
claim the 3-epoch study left open (ResNet-56 against ResNet-20) first, then
the second seeds of those two, then ResNet-32; the sweep resumes where it
stopped.
"""
from configs.sweeps import fashion_mnist_depth

EPOCHS = 15.0


def get_config():
  c = fashion_mnist_depth.get_config()
  c.num_epochs = EPOCHS
  c.schedule.boundaries = (EPOCHS / 2, EPOCHS * 3 / 4)
  c.log_every_steps = 78               # a sixth of an epoch (468 steps)
  c.eval_every_steps = 468             # every epoch
  c.checkpoint_every_steps = 468
  return c


def get_sweep():
  members = [('resnet20', 0), ('resnet56', 0), ('plain56', 0), ('plain20', 0),
             ('resnet20', 1), ('resnet56', 1), ('resnet32', 0)]
  return {f'{name}-seed{seed}': {'model.name': name, 'seed': seed} for name, seed in members}
