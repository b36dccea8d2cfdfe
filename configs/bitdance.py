r"""BitDance class-to-image on UniWeTok's binary codes (unimm_jax/systems/bitdance.py): an
autoregressive transformer over the tokenizer's d-bit tokens, P at a time, with a binary
diffusion head; UniWeTok's decoder renders (UniWeTok paper Table 9).

Variants, chosen by the text after the colon (comma-separated, applied in order):
  tiny      tests: the tiny UniWeTok (32 px, 8 x 8 tokens of 16 bits), a 2-block generator 32
            wide, 4 tokens per step, on the built-in scene classes.
  demo      the built-in scene classes (28 = 7 colours x 4 shapes, one object per image) at
            32 px: a UniWeTok trained on them first (configs/uniwetok.py:scene_classes,
            --config.system.tokenizer_path=its workdir; `bash launch/demo.sh bitdance`),
            then a generator 128 wide, 4 blocks, 2 x 2 tokens per step.
  b, l, h   the authors' BitDance-B / -L / -H (24 x 768, 32 x 1024, 40 x 1280; heads of 64;
            diffusion heads 6 / 8 / 12 blocks sharing 2 / 2 / 3 adaLN projections, as wide as
            the model) on ImageNet 256 px (TFDS imagenet2012, or point config.data at a
            folder of class subdirectories) through the paper's UniWeTok (f 32: 8 x 8 tokens
            of 128 bits; --config.system.tokenizer_path its workdir or the authors'
            .safetensors). Their training: AdamW lr 6e-4, betas (0.9, 0.95), weight decay
            0.05 but not on biases, norms, class table, queries and connector, 20k warm-up
            steps then cosine decay (to 1e-5 in theirs, to 0 here), grad clip 1, EMA 0.9999,
            batch 1024, 800 epochs, bf16, class dropout 0.1, bit flips 0.1, 64 class tokens,
            4 noise draws per token; sampling 100 steps with the CFG scale ramping linearly
            from 1 to 3.2 / 4.0 / 4.55.
  p4, p16   their parallel models (BitDance-B-4x / -16x): 4 or 16 tokens per step in 2 x 2
            or 4 x 4 patches with the attention head; CFG 3.9 / 6.1.
  serial    one token per step (their 1x models; the default of b, l, h).

  python -m unimm_jax.main --config=configs/bitdance.py:demo --workdir=/tmp/bitdance \
      --config.system.tokenizer_path=/tmp/uniwetok_scene_classes
  python -m unimm_jax.main --mode=generate --workdir=/tmp/bitdance --class_id=0 \
      --output=/tmp/red_circles
"""
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.data import scenes

# Weight decay applies to matrices only, and not to the class table, the queries and the
# connector (their `non_decay_keys`); paths as 'generator/head/res_blocks_0/ffn/norm/bias'.
_NO_DECAY = r"generator/(class_table|queries|connector/.*)|.*(bias|scale)"


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the BitDance class-to-image config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "class_to_image"
  config.data.source = "scene_classes"
  config.data.image_size = 32
  config.data.num_workers = 0
  config.system = ml_collections.ConfigDict(dict(
      name="bitdance",
      # A UniWeTok tokenizer workdir or the authors' state dict (.safetensors); '' = a random
      # tokenizer (plumbing tests only).
      tokenizer_path=""))
  config.vq = config_defaults.load_config("configs/uniwetok.py:tiny").model
  # models/bitdance.py BitDanceConfig, but latent_dim and grid, which the tokenizer and
  # data.image_size fix. num_classes: the data's (the null class is one more row).
  config.model = ml_collections.ConfigDict(dict(
      num_classes=len(scenes.CLASS_NAMES), width=768, depth=24, num_heads=12,
      class_tokens=64, parallel=1, order="patch", head_width=0, head_depth=6,
      head_adaln_blocks=2, head_head_dim=64, head_bounded=True, class_dropout=0.1,
      bit_flip=0.1, noise_repeats=4, t_mean=-0.8, t_std=0.8, time_shift=1.0,
      dtype="float32", remat=False))
  config.generation = ml_collections.ConfigDict(dict(
      num_steps=100, cfg_scale=3.2, cfg_schedule="linear", temperature=1.0))
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=6e-4, b1=0.9, b2=0.95, weight_decay=0.05, schedule="cosine",
      warmup_steps=20_000, grad_clip=1.0,
      groups=ml_collections.ConfigDict(dict(
          no_decay=dict(pattern=_NO_DECAY, lr_mult=1.0, weight_decay=0.0, frozen=False)))))
  config.ema_decay = 0.9999
  # Every evaluation draws num_generations images (classes in turn); FID needs
  # inception_path (README: FID Inception weights).
  config.eval.num_generations = 112
  config.train.batch_size = 1024
  return config_defaults.apply_variants(config, arg, _VARIANTS, "configs/bitdance.py")


def _size(width: int, depth: int, heads: int, head_depth: int, head_adaln: int, cfg: float):
  def apply(config):
    config.model.update(dict(width=width, depth=depth, num_heads=heads, head_depth=head_depth,
                             head_adaln_blocks=head_adaln, class_tokens=64, num_classes=1000,
                             dtype="bfloat16", remat=True))
    config.generation.cfg_scale = cfg
    config.vq = config_defaults.load_config("configs/uniwetok.py:paper").model
    config.data.update(dict(source="tfds", tfds_name="imagenet2012", split="train",
                            eval_split="validation", image_size=256, num_workers=8))
    config.train.update(dict(steps=1_000_800, log_every=100, image_every=10_000,
                             checkpoint_every=10_000, eval_every=50_000))
    config.eval.num_generations = 1000
    config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return apply


def _parallel(p: int, cfg: float):
  def apply(config):
    config.model.parallel, config.model.order = p, "patch"
    config.generation.cfg_scale = cfg
  return apply


def _serial(config):
  config.model.parallel = 1


def _tiny(config):
  config.model.update(dict(width=32, depth=2, num_heads=2, class_tokens=2, parallel=4,
                           head_depth=2, head_adaln_blocks=1, head_head_dim=16,
                           noise_repeats=2))
  config.generation.update(dict(num_steps=4, cfg_scale=2.0))
  config.optim.update(dict(lr=1e-3, warmup_steps=0, schedule="constant"))
  config.ema_decay = 0.9
  config_defaults.set_test_schedule(config)
  config.train.eval_num_images = 4
  config.eval.num_generations = 4


def _demo(config):
  config.vq = config_defaults.load_config("configs/uniwetok.py:scene_classes").model
  config.model.update(dict(width=128, depth=4, num_heads=4, class_tokens=4, parallel=4,
                           head_depth=2, head_adaln_blocks=1, head_head_dim=32))
  config.generation.update(dict(num_steps=50, cfg_scale=3.0))
  config.optim.update(dict(lr=1e-3, warmup_steps=50))
  config.ema_decay = 0.99
  config.train.update(dict(batch_size=32, steps=1500, log_every=50, image_every=500,
                           checkpoint_every=500, eval_every=500, eval_num_images=64))
  config.eval.num_generations = 112


_VARIANTS = {
    "tiny": _tiny,
    "demo": _demo,
    "b": _size(768, 24, 12, 6, 2, 3.2),
    "l": _size(1024, 32, 16, 8, 2, 4.0),
    "h": _size(1280, 40, 20, 12, 3, 4.55),
    "p4": _parallel(4, 3.9),
    "p16": _parallel(16, 6.1),
    "serial": _serial,
}
