"""ImageNet (ILSVRC-2012) recipes for the paper's ImageNet nets.

    python run.py --config=configs/imagenet.py:resnet50 --workdir=DIR \
        --config.data.data_dir=/data/tfds
    python run.py --config=configs/imagenet.py:resnet50,cosine --workdir=DIR ...

The paper's recipe (Sec. 3.4): batch 256 (BN statistics over 32 images, as on
its 8 GPUs), lr 0.1 divided by 10 when the validation error plateaus, up to
60e4 iterations, weight decay 1e-4, momentum 0.9; shorter side resized to a
random size in [256, 480], random 224x224 crop, flip, per-pixel mean
subtraction ("the per-pixel mean subtracted"; the mean of the train images
resized to 224x224, computed once and cached beside the data) and AlexNet PCA
colour noise; option B shortcuts. Evaluated every epoch on the centre crop of
the 256-resized image (cheap), and at the end also with the paper's 10-crop
testing (eval_ten_crop_* metrics).

`cosine`: the common modern variant: 90 epochs, 5 epochs of linear warm-up then
cosine decay, lr 0.1 x batch/256, Inception-style random-resized crops,
stride on the 3x3 conv of bottlenecks (v1.5) and zero-initialised last BN.

The data set must be prepared once from the ILSVRC tars (run.py --mode=prepare).
"""
from configs import default

IMAGENET_NETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'plain18',
                 'plain34', 'vgg19')


def get_config(arg: str = 'resnet50'):
  name, *flags = arg.split(',')
  if name not in IMAGENET_NETS or set(flags) - {'cosine'}:
    raise ValueError(f'configs/imagenet.py:{arg}: use NET or NET,cosine with NET one of '
                     f'{", ".join(IMAGENET_NETS)}.')
  c = default.get_config()
  c.model.name = name
  c.model.bn_group_size = 32

  c.data.name = 'imagenet2012'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.train_augment = 'scale'
  c.data.scale_range = (256, 480)
  c.data.pca_lighting = 0.1
  c.data.normalize = 'per_pixel_mean'
  c.data.eval_resize = 256
  c.data.eval_crop = 'center'
  c.data.final_eval_crop = 'ten_crop'
  c.data.workers = -1                # one grain worker process per host core: JPEG decoding

  c.batch_size = 256
  c.eval_batch_size = 256
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 1e-4
  c.num_train_steps = 600_000
  c.schedule.name = 'plateau'
  c.schedule.factor = 0.1
  c.schedule.patience = 5           # evaluations (epochs) without improvement
  c.schedule.min_improvement = 0.002
  c.log_every_steps = 100
  c.eval_every_steps = 0            # once per epoch
  c.checkpoint_every_steps = 0

  if 'cosine' in flags:
    c.model.bottleneck_stride = '3x3' if name in ('resnet50', 'resnet101', 'resnet152') else None
    c.model.zero_init_last_bn = None if name in ('vgg19',) or name.startswith('plain') else True
    c.model.bn_group_size = 0
    c.data.train_augment = 'inception'
    c.data.pca_lighting = 0.0
    c.data.normalize = 'imagenet_mean_std'
    c.data.final_eval_crop = ''
    c.num_train_steps = -1
    c.num_epochs = 90.0
    c.optimizer.base_batch_size = 256
    c.schedule.name = 'cosine'
    c.schedule.unit = 'epochs'
    c.schedule.warmup_length = 5.0
  return c
