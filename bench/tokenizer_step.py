"""Train-step throughput of the UniWeTok tokenizer and its achieved FLOP/s.

Measures, in one process on whatever backend JAX picks:
  * the peak of a square float32 GEMM (the roof we compare against),
  * images/s of the jitted, donated train step for the demo config (64 px) and for a
    paper-width config at 128 px (channel 128, mult [1,1,2,2,4,8], 16 attention blocks,
    with WeTok's LPIPS + PatchGAN losses),
  * achieved FLOP/s = XLA's cost-analysis FLOPs of the compiled step x steps/s.

  python bench/tokenizer_step.py [--steps 5] [--paper_batch 4]

With --peer SRC (an export of the authors' BitDance files, as tests/fixtures/
make_uniwetok_fixture.py describes: modeling/vision_encoder/autoencoder_uni.py, utils/fs.py,
imagenet_gen/src/gfq.py) it times instead, in this one process, the authors' autoencoder
(their Encoder + GANDecoder, flash attention replaced by exact softmax attention on CPU) and
ours at the [perf] issue's shape (ch 64, mult [1,1,2,2,4,8], 2 residual blocks per level,
2 attention blocks of 4 heads, 16 x 8 bits, 128 px, batch 4): one train step = encode, sign
with a straight-through gradient, decode, L1, Adam (lr 1e-4, betas (0.5, 0.9)); no EMA, GAN,
LPIPS or entropy terms on either side. It prints both images/s and ours / theirs.
"""
import argparse
import os
import sys
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


PEER_SHAPE = dict(ch=64, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=2, num_attn_blocks=2,
                  num_heads=4, groups=16, group_bits=8, image_size=128, batch=4)


def peer_shape_config():
  """Our UniWeTok at PEER_SHAPE, trained on L1 alone with their Adam and no EMA."""
  config = config_defaults.load_config("configs/uniwetok.py:paper")
  m, shape = config.model, PEER_SHAPE
  m.ch, m.ch_mult, m.num_res_blocks = shape["ch"], shape["ch_mult"], shape["num_res_blocks"]
  m.num_attn_blocks, m.num_heads = shape["num_attn_blocks"], shape["num_heads"]
  m.groups, m.group_bits = shape["groups"], shape["group_bits"]
  config.data.image_size, config.train.batch_size = shape["image_size"], shape["batch"]
  for term in config.loss:
    config.loss[term] = 1.0 if term == "l1" else 0.0
  config.ema_decay = 0.0
  return config


def bench_peer(src: str, steps: int) -> dict:
  """images/s of the authors' autoencoder's train step at PEER_SHAPE (module docstring)."""
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                  "fixtures"))
  from make_uniwetok_fixture import import_their_modules  # pylint: disable=import-outside-toplevel
  autoencoder_uni, _ = import_their_modules(src)

  class Unloaded(autoencoder_uni.VQModel):
    def load_from_ckpt(self, checkpoint):
      del checkpoint  # randomly initialised: only the time matters

  shape = PEER_SHAPE
  ddconfig = dict(ch=shape["ch"], out_ch=3, in_channels=3,
                  num_res_blocks=shape["num_res_blocks"],
                  z_channels=shape["groups"] * shape["group_bits"], ch_mult=list(shape["ch_mult"]),
                  resolution=shape["image_size"], double_z=False,
                  attn_blocks=shape["num_attn_blocks"], n_heads=shape["num_heads"])
  model = Unloaded(ddconfig).train()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
  size, batch = shape["image_size"], shape["batch"]
  images = torch.from_numpy(np.random.default_rng(0).uniform(
      -1, 1, (batch, 3, size, size)).astype(np.float32))

  def step():
    h = model.encoder(images)
    quantized = h + (torch.where(h > 0, 1.0, -1.0) - h).detach()  # straight-through sign
    loss = (model.decode(quantized) - images).abs().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  step()  # warm-up
  start = time.perf_counter()
  for _ in range(steps):
    step()
  seconds = (time.perf_counter() - start) / steps
  params = sum(p.numel() for p in model.parameters())
  return dict(images_per_sec=batch / seconds, step_seconds=seconds, params=params,
              threads=torch.get_num_threads())


def compare_with_peer(src: str, steps: int, peak: float) -> None:
  ours = bench_train_step(peer_shape_config(), steps)
  theirs = bench_peer(src, steps)
  print(f"ours: {ours['params'] / 1e6:.1f}M params, {ours['step_seconds'] * 1e3:.0f} ms/step, "
        f"{ours['images_per_sec']:.2f} images/s, {ours['flops_per_step'] / 1e9:.1f} "
        f"GFLOP/step, {ours['achieved_flops'] / 1e9:.1f} GFLOP/s = "
        f"{100 * ours['achieved_flops'] / peak:.1f}% of peak GEMM")
  print(f"theirs (PyTorch, {theirs['threads']} threads): {theirs['params'] / 1e6:.1f}M params, "
        f"{theirs['step_seconds'] * 1e3:.0f} ms/step, {theirs['images_per_sec']:.2f} images/s")
  print(f"ours / theirs: {ours['images_per_sec'] / theirs['images_per_sec']:.2f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--paper_batch", type=int, default=4)
  parser.add_argument("--gemm_n", type=int, default=0, help="0: 2048 on CPU, 8192 else")
  parser.add_argument("--peer", default="", help="an export of the authors' BitDance files "
                      "(module docstring): time theirs beside ours at the [perf] shape")
  args = parser.parse_args()

  backend = jax.default_backend()
  n = args.gemm_n or default_gemm_size()
  peak = peak_gemm_flops(n)
  print(f"backend {backend} ({jax.device_count()} device(s): {jax.devices()[0].device_kind})")
  print(f"peak float32 GEMM {n}x{n}: {peak / 1e9:.1f} GFLOP/s")

  if args.peer:
    compare_with_peer(args.peer, args.steps, peak)
    return
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
