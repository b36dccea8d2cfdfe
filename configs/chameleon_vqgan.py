r"""Chameleon's VQGAN image tokenizer (taming VQGAN, 8192 codes, downsample 16).

Variants, chosen by the text after the colon:
  configs/chameleon_vqgan.py:tiny    tests: 32 px synthetic images, tiny widths, no GAN.
  configs/chameleon_vqgan.py:demo    32 px built-in scenes, downsample 4, 512 codes: trains
                                     in about 3 minutes on 2 CPU cores (the unified demo's VQ).
  configs/chameleon_vqgan.py:paper   the released tokenizer's shape: 512 px -> 32 x 32 codes,
                                     ch 128, ch_mult (1,1,2,2,4), 2 res blocks, z 256, codes
                                     of 256 from 8192, attention in the middle block (the
                                     lowest resolution). Chameleon publishes no tokenizer
                                     training settings; the loss and optimiser are taming's
                                     VQGAN recipe (L1 + LPIPS + codebook loss, PatchGAN with
                                     the adaptive weight 0.8, Adam betas (0.5, 0.9)). Needs
                                     config.lpips.path.
After a size, `gan` turns the GAN on (`tiny,gan`, `demo,gan`) with a PatchGAN at most 32 wide.

Loss terms (config.loss): l1, l2, perceptual (LPIPS), embedding (the quantizer's VQ loss,
beta and its placement in config.model), gan (the generator's adversarial term).

To start from released weights: `--mode=import --input=DIR_OR_FILE` with a transformers
`chameleon_vqgan` / `chameleon` directory (no decoder: initialised) or the authors' VQModel
state dict as one safetensors file (README).
"""
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.models import chameleon_vqgan


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the Chameleon VQGAN config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "tokenizer"
  config.model = chameleon_vqgan.paper_model_config()
  config.loss = ml_collections.ConfigDict(dict(
      l1=1.0,
      l2=0.0,
      perceptual=1.0,  # LPIPS (VGG); needs config.lpips.path
      embedding=1.0,  # the quantizer's loss (taming's codebook_weight)
      gan=0.8,  # taming's disc_weight, times the adaptive weight; 0 = no discriminator
  ))
  config.lpips = config_defaults.lpips_config()
  # taming's NLayerDiscriminator (3 layers, ndf 64, BatchNorm), hinge losses, the adaptive
  # generator weight on the decoder's last conv, and a late start.
  config.disc = config_defaults.disc_config(
      g_loss="hinge", average_patches_first=False, start=250_001, lecam=0.0, adaptive=True,
      lr=2.88e-4)
  # taming's rule lr = 4.5e-6 x batch size, at the paper variant's batch of 64.
  config.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=2.88e-4, b1=0.5, b2=0.9, weight_decay=0.0,
      schedule="constant", warmup_steps=0, grad_clip=0.0,
      groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.0  # taming keeps no parameter EMA
  return config_defaults.apply_variants(config, arg, _VARIANTS, "configs/chameleon_vqgan.py")


def _paper(config):
  config.data.image_size = 512
  config.train.batch_size = 64
  config.train.steps = 500_000


def _on_cpu(config, ch_mult, z_channels, embed_dim, n_embed, image_size):
  """Sizes that train on a CPU: no LPIPS (no weights ship offline), no GAN (too few steps),
  width 16, one ResBlock per level, a higher learning rate, no data workers."""
  config.loss.update(dict(perceptual=0.0, gan=0.0))
  config.model.update(dict(ch=16, ch_mult=ch_mult, num_res_blocks=1, z_channels=z_channels,
                           embed_dim=embed_dim, n_embed=n_embed, norm_groups=4))
  config.data.update(dict(image_size=image_size, num_workers=0))
  config.optim.lr = config.disc.lr = 1e-3
  config.disc.start = 0


def _demo(config):
  """32 px scenes -> 8 x 8 codes of 512. The encoder has no ResBlocks (num_res_blocks 0, the
  decoder one per level): at width 16 deeper stacks learn these flat-coloured scenes far
  more slowly than the demo's few minutes allow."""
  _on_cpu(config, ch_mult=(1, 2, 4), z_channels=32, embed_dim=16, n_embed=512,
          image_size=32)
  config.model.num_res_blocks = 0
  config.data.source = "scenes"  # the built-in procedural scenes the unified demo uses
  config.optim.b1, config.optim.b2 = 0.9, 0.99
  config.train.update(dict(batch_size=16, steps=1500, log_every=100, image_every=500,
                           checkpoint_every=500, eval_every=500, eval_num_images=16))
  config.eval.update(dict(num_images=64, batch_size=16))


def _tiny(config):
  _on_cpu(config, ch_mult=(1, 2, 2), z_channels=16, embed_dim=8, n_embed=64, image_size=32)
  config.data.source = "synthetic"
  config.disc.ndf = 8
  config_defaults.set_test_schedule(config)
  config.train.eval_num_images = 4
  config.eval.update(dict(num_images=6, batch_size=4))


def _gan(config):
  """Turns the GAN on (after a size variant): a narrower PatchGAN for CPU runs."""
  config.loss.gan = 0.8
  config.disc.ndf = min(config.disc.ndf, 32)


_VARIANTS = {"paper": _paper, "demo": _demo, "tiny": _tiny, "gan": _gan}
