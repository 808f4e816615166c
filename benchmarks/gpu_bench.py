"""ResNet-50 training throughput on one accelerator: resnet_jax (bf16, f32) and, if present, PyTorch.

    python benchmarks/gpu_bench.py                       # ResNet-50, 224x224, batch 256
    python benchmarks/gpu_bench.py --model=resnet18 --batch=4 --image=64 --steps=2   # CPU smoke run

Needs only jax (with CUDA), flax and optax: synthetic data lives on the device,
and resnet_jax's model and step modules import neither TensorFlow nor tfds,
clu or ml_collections. Prints, per dtype, images/s, step time, compile time
and MFU (XLA cost-analysis FLOPs per step / step time / --peak_tflops; the
default 790 is an H200's bf16 figure used for both dtypes). Where torch and
torchvision are installed, their resnet50 (channels_last, bf16 autocast,
torch.compile where it works) runs side by side on the same device.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_config(lr: float = 0.1) -> types.SimpleNamespace:
  """The fields resnet_jax.optim and steps read, without ml_collections."""
  ns = types.SimpleNamespace
  return ns(batch_size=0, optimizer=ns(learning_rate=lr, momentum=0.9, nesterov=False,
                                       weight_decay=1e-4, decay_bn_and_bias=False,
                                       base_batch_size=0),
            schedule=ns(name='constant', unit='steps', boundaries=(), factor=0.1,
                        warmup_length=0.0, warmup_lr=0.0, warmup_until_error=0.8))


def bench_jax(model_name: str, batch: int, image: int, dtype: str, steps: int,
              peak_tflops: float) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from resnet_jax import models, optim, steps as steps_lib  # pylint: disable=import-outside-toplevel

  config = bench_config()
  model = models.create_model(model_name, 1000, dtype=dtype)
  tx = optim.create_optimizer(config)
  train_fn, _ = steps_lib.make_steps(model, tx, config, optim.schedule_fn(config, 1, steps))
  state = jax.jit(lambda rng: steps_lib.create_train_state(
      model, tx, config, (image, image, 3), rng))(jax.random.key(0))
  key_x, key_y = jax.random.split(jax.random.key(1))
  batch_data = {'image': jax.random.normal(key_x, (batch, image, image, 3), jnp.float32),
                'label': jax.random.randint(key_y, (batch,), 0, 1000)}
  step = jax.jit(train_fn, donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch_data).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch_data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch_data)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  return {'name': f'resnet_jax {model_name} {dtype}', 'img_per_s': batch / step_s,
          'step_ms': 1e3 * step_s, 'compile_s': compile_s,
          'mfu': flops / step_s / (peak_tflops * 1e12) if flops else float('nan'),
          'device': str(jax.devices()[0].device_kind)}


def bench_torch(model_name: str, batch: int, image: int, steps: int) -> list[dict]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  results = []
  for compiled in (False, True):
    model = getattr(torchvision.models, model_name)().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, image, image, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    forward = model
    if compiled:
      try:
        forward = torch.compile(model)
      except Exception:  # pylint: disable=broad-except
        continue

    def step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(forward(x), y)
      loss.backward()
      optimizer.step()

    try:
      start = time.perf_counter()
      step()
      _sync(torch, device)
      first = time.perf_counter() - start
      step()
      _sync(torch, device)
      start = time.perf_counter()
      for _ in range(steps):
        step()
      _sync(torch, device)
    except Exception as e:  # pylint: disable=broad-except  (torch.compile may fail here)
      print(f'torch {"compile" if compiled else "eager"} failed: {type(e).__name__}: {e}')
      continue
    step_s = (time.perf_counter() - start) / steps
    results.append({'name': f'torch {torch.__version__} {model_name} bf16 autocast, '
                            f'channels_last{", compile" if compiled else ""}',
                    'img_per_s': batch / step_s, 'step_ms': 1e3 * step_s,
                    'compile_s': first - step_s, 'mfu': float('nan'), 'device': device})
  return results


def _sync(torch, device):
  if device == 'cuda':
    torch.cuda.synchronize()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--image', type=int, default=224)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--peak_tflops', type=float, default=790.0)
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  print(f'$ python {" ".join(sys.argv)}', flush=True)
  rows = [bench_jax(args.model, args.batch, args.image, dtype, args.steps, args.peak_tflops)
          for dtype in args.dtypes.split(',')]
  print(f'device: {rows[0]["device"]}; {args.model}, batch {args.batch}, '
        f'{args.image}x{args.image}, synthetic data')
  if not args.no_torch:
    rows += bench_torch(args.model, args.batch, args.image, args.steps)
  print(f'{"implementation":62} {"img/s":>9} {"step ms":>9} {"compile s":>9} {"MFU":>6}')
  for r in rows:
    mfu = '-' if np.isnan(r['mfu']) else f'{100 * r["mfu"]:.1f}%'
    print(f'{r["name"]:62} {r["img_per_s"]:9.1f} {r["step_ms"]:9.1f} {r["compile_s"]:9.1f} '
          f'{mfu:>6}')


if __name__ == '__main__':
  main()
