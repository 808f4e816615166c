"""Zero-download quickstart: ResNet-20 on scikit-learn's real handwritten digits.

    python run.py --config=configs/default.py --workdir=/tmp/quickstart

Every other config starts from this one and overrides what differs, so this
file is also the reference for every field.
"""
from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  """Returns the quickstart config; all fields can be overridden on the command line."""
  c = config_dict.ConfigDict()

  # --- Model (resnet_jax.models.create_model). None: the family's default. ---
  c.model = config_dict.ConfigDict()
  c.model.name = 'resnet20'
  c.model.shortcut = config_dict.placeholder(str)           # 'A' | 'B' | 'C'
  c.model.bottleneck_stride = config_dict.placeholder(str)  # '1x1' (paper) | '3x3' (v1.5)
  c.model.zero_init_last_bn = config_dict.placeholder(bool)
  c.model.batch_norm = config_dict.placeholder(bool)        # vgg19 only
  c.model.dtype = 'float32'                                 # compute dtype; params stay float32
  # BN statistics over groups of this many examples (the paper: 64 per GPU on
  # CIFAR, 32 on ImageNet); 0: over the whole global batch.
  c.model.bn_group_size = 0
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  # BN variance in one pass, E[x^2] - E[x]^2 in float32 (one read of x fewer, and
  # one collective fewer where BN syncs over pmap devices) or in two (exact for
  # large means). None: one pass on GPU/TPU, where BN is memory bound; two on CPU.
  c.model.bn_fast_variance = config_dict.placeholder(bool)

  # --- Kernels (resnet_jax/backend.py). ---
  # The CPU plugin (resnet_jax/cpu): the same convolutions on oneDNN's kernels
  # under XLA:CPU, decided once at start-up for every host. 'auto': on for CPU
  # runs where its checks pass (the kernel gradients also need g++ and the
  # `cpu` extra), XLA's kernels otherwise; 'on': the same, but stop if it cannot
  # run; 'off': XLA's kernels. $RESNET_JAX_CPU_KERNELS (on|off) replaces 'auto'.
  # WORKDIR/config.json records what it resolved to (cpu_kernels_used).
  c.cpu_kernels = 'auto'

  # --- Data (resnet_jax/data: tfds data sets prepared as ArrayRecord, read with grain). ---
  c.data = config_dict.ConfigDict()
  c.data.name = 'sklearn_digits'         # any tfds image-classification data set
  c.data.data_dir = config_dict.placeholder(str)    # tfds data_dir (None: tfds default)
  c.data.manual_dir = config_dict.placeholder(str)  # where the user's archives are (imagenet2012)
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  # Hold out this many training examples and evaluate on them instead of
  # eval_split (the paper's 45k/5k CIFAR-10 split); 0 keeps the full train split.
  c.data.validation_size = 0
  c.data.image_size = 32                 # images are resized to this (8x8 digits: upsampled)
  # 'pad_crop_flip' (CIFAR, paper Sec. 4.2) | 'pad_crop' | 'scale' (ImageNet,
  # paper Sec. 3.4) | 'inception' (random-resized crop) | 'none'.
  c.data.train_augment = 'pad_crop'      # no flips: a mirrored digit is not a digit
  c.data.crop_padding = 4
  c.data.scale_range = (256, 480)        # shorter side for 'scale'
  c.data.pca_lighting = 0.0              # AlexNet colour noise std for 'scale' (paper: 0.1)
  # 'per_pixel_mean' (of the train split, computed once and cached) |
  # 'imagenet_mean' | 'imagenet_mean_std' (fixed RGB statistics).
  c.data.normalize = 'per_pixel_mean'
  c.data.eval_resize = 0                 # shorter side before the eval crop; 0: resize whole image
  # 'center' | 'ten_crop' (paper Tables 2-3) | 'multi_scale' (Sec. 3.4, Tables 4-5:
  # the fully-convolutional net on the whole image at each shorter side below,
  # and its mirror; softmax averaged over all of them. Each image is resized,
  # put at the top left of a square canvas (4:3 of the side, in steps of 32; a
  # longer side is centre-cropped to it) and the pooling covers only the image).
  c.data.eval_crop = 'center'
  c.data.multi_scale_sides = (224, 256, 384, 480, 640)
  # At the last step, evaluate once more with this crop ('' = not): metrics
  # eval_<crop>_top1_error etc. (the paper's ImageNet recipe: 'ten_crop').
  c.data.final_eval_crop = ''
  # Reading (resnet_jax/data, grain). Batches do not depend on these: only speed and memory.
  c.data.workers = 0                     # grain worker processes per host (0: none; -1: one per core)
  c.data.threads = 0                     # decoding threads per process (0: the cores / processes)
  c.data.worker_buffer = 2               # batches each worker keeps ready
  c.data.read_buffer = 2                 # batches each process reads ahead
  c.data.prefetch = 2                    # batches on their way to the devices

  # --- Optimisation. ---
  c.batch_size = 128                     # global, over all devices and hosts
  c.eval_batch_size = 512
  c.num_epochs = 12.0                    # or set num_train_steps (wins when > 0)
  c.num_train_steps = -1
  c.optimizer = config_dict.ConfigDict()
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4        # L2 on conv and dense kernels
  c.optimizer.decay_bn_and_bias = False  # also decay BN scale/bias and dense bias
  # > 0: scale learning_rate by batch_size / base_batch_size (e.g. 256 on ImageNet).
  c.optimizer.base_batch_size = 0

  c.schedule = config_dict.ConfigDict()
  # 'constant' | 'step' | 'plateau' | 'cosine'. 'step' divides by `factor` at
  # each boundary; 'plateau' divides by `factor` when the eval error has not
  # improved for `patience` evaluations; 'cosine' decays to 0 after warm-up.
  c.schedule.name = 'step'
  c.schedule.unit = 'epochs'             # unit of boundaries/warmup_length: 'steps' | 'epochs'
  c.schedule.boundaries = (6.0, 9.0)
  c.schedule.factor = 0.1
  c.schedule.patience = 3
  c.schedule.min_improvement = 1e-3      # absolute drop in eval error that counts
  c.schedule.warmup_length = 0.0         # linear warm-up from 0 (cosine / step)
  # The paper's ResNet-110 warm-up: use warmup_lr until the training error is
  # below warmup_until_error, then return to the schedule. 0 disables it.
  c.schedule.warmup_lr = 0.0
  c.schedule.warmup_until_error = 0.8

  # A torchvision ResNet or VGG-19 weights file (.npz, .safetensors; .pth needs torch)
  # to start a new run from, or to evaluate with --mode=eval in a workdir without
  # checkpoints (resnet_jax/torchvision_weights.py). ResNet-50/101/152 need
  # model.bottleneck_stride='3x3' (torchvision's nets); a classifier of another
  # size is replaced by a fresh one. Inputs as torchvision's: data.normalize=imagenet_mean_std.
  c.init_from = ''

  # --- Parallelism. ---
  c.parallel = 'jit'                     # 'jit' (mesh, multi-host) | 'pmap'

  # --- Logging, evaluation, checkpoints. ---
  c.seed = 0
  c.log_every_steps = 20
  c.eval_every_steps = 0                 # 0: once per epoch
  c.checkpoint_every_steps = 0           # 0: once per epoch
  c.keep_checkpoints = 3
  c.profile = False                      # capture a profile of a few steps
  # Resuming a workdir with a config that changes what is trained (model, data, batch
  # size, optimizer, schedule, seed) stops and lists the differences; True lets it go
  # on. Either way the changes are recorded in WORKDIR/config_changes.jsonl. Logging,
  # evaluation and checkpoint periods, more steps or epochs, the data location and the
  # loader's workers and buffers may always change.
  c.allow_resume_changes = False
  return c
