"""Train-step throughput of the UniWeTok tokenizer and its achieved FLOP/s.

Measures, in one process on whatever backend JAX picks:
  * the peak of a square float32 GEMM (the roof we compare against),
  * images/s of the jitted, donated train step for the demo config (64 px) and for a
    paper-width config at 128 px (channel 128, mult [1,1,2,2,4,8], 16 attention blocks,
    with WeTok's LPIPS + PatchGAN losses),
  * achieved FLOP/s = XLA's cost-analysis FLOPs of the compiled step x steps/s.

  python bench/tokenizer_step.py [--steps 5] [--paper_batch 4]
"""
import argparse
import time

import jax
import numpy as np

from common import compiled_flops, default_gemm_size, peak_gemm_flops
from unimm_jax import config_defaults
from unimm_jax.train import trainer


def bench_train_step(config, steps: int) -> dict:
  """Compiles the trainer's train step once and times `steps` calls after a warm-up."""
  setup = trainer.Setup(config)
  state = setup.init_state()
  size, batch = config.data.image_size, config.train.batch_size
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  batch_arrays = {"image": setup.global_images(images, host_local=True)}
  with setup.activate():
    compiled = setup.compile_train_step().lower(
        state, setup.frozen, batch_arrays, setup.train_rng).compile()
  flops = compiled_flops(compiled)
  state, metrics = compiled(state, setup.frozen, batch_arrays, setup.train_rng)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, setup.frozen, batch_arrays, setup.train_rng)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(images_per_sec=batch / seconds, step_seconds=seconds, flops_per_step=flops,
              achieved_flops=flops / seconds, params=params, batch=batch, size=size)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--paper_batch", type=int, default=4)
  parser.add_argument("--gemm_n", type=int, default=0, help="0: 2048 on CPU, 8192 else")
  args = parser.parse_args()

  backend = jax.default_backend()
  n = args.gemm_n or default_gemm_size()
  peak = peak_gemm_flops(n)
  print(f"backend {backend} ({jax.device_count()} device(s): {jax.devices()[0].device_kind})")
  print(f"peak float32 GEMM {n}x{n}: {peak / 1e9:.1f} GFLOP/s")

  demo = config_defaults.load_config("configs/uniwetok.py:demo")
  paper = config_defaults.load_config("configs/uniwetok.py:paper")
  paper.data.image_size = 128
  paper.train.batch_size = args.paper_batch
  # The paper step includes LPIPS and the GAN; a random VGG trunk costs the same as the
  # pretrained one, which this benchmark does not need.
  paper.lpips.allow_random = True
  for name, config in (("demo (64 px)", demo), ("paper width (128 px)", paper)):
    r = bench_train_step(config, args.steps)
    print(f"{name}: batch {r['batch']}, {r['params'] / 1e6:.1f}M params, "
          f"{r['step_seconds'] * 1e3:.0f} ms/step, {r['images_per_sec']:.1f} images/s, "
          f"{r['flops_per_step'] / 1e9:.1f} GFLOP/step, "
          f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s = "
          f"{100 * r['achieved_flops'] / peak:.1f}% of peak GEMM")


if __name__ == "__main__":
  main()
