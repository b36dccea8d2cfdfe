r"""UniWeTok binary tokenizer (16 groups x 8 bits, codebook 2^128).

Variants, chosen by the text after the colon:
  configs/uniwetok.py:tiny    tests: 32 px, a train step in well under a second on CPU.
  configs/uniwetok.py:demo    the README demo: 64 px built-in photos, ~10 min on 2 CPU cores.
  configs/uniwetok.py:scene_classes  the BitDance class-to-image demo's tokenizer
                              (configs/bitdance.py:demo): 32 px built-in scene classes, 8 x 8
                              tokens of 8 x 4 bits, ~5 min on 2 CPU cores.
  configs/uniwetok.py:scenes  the same model on the built-in multi-object scenes: the
                              BitDance MLLM demo's tokenizer (configs/bitdance_mllm.py:demo).
  configs/uniwetok.py:paper   the appendix configuration (Tables 14-33): 256 px, channel 128,
                              mult [1,1,2,2,4,8], 2 res blocks, 16 attention blocks, 16 x 8 bits,
                              Adam 1e-4 betas (0.5, 0.9), EMA, batch 128.
Curriculum stages (paper 3.3), after a size, each run with --config.train.init_from=<the
previous stage's workdir>:
  stage1   fixed resolution (data.image_size) on general data: the size variant as it is.
  stage2   several resolutions trained together: buckets (s, B) and (2s, B / 4) for
           image_size s and batch B (same pixels per step; the paper does not list its
           resolutions, so this pair is our default), one compiled step per bucket.
  stage3   annealing on faces and text: the built-in face and text images (user data: point
           config.data at them), cosine decay of the learning rate to 0.
Ablation rows tableN_rowM (Tables 1-7, e.g. `tiny,table1_row3`): see the comment above
_TABLE_SETTINGS; rows with distillation need --config.teacher.path.

Any field can be overridden on the command line, e.g.
  python -m unimm_jax.main --config=configs/uniwetok.py:demo --workdir=/tmp/run \
      --config.train.steps=500 --config.mesh.fsdp=2
"""
import ml_collections

from unimm_jax import config_defaults


def _paper_model() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="uniwetok",
      ch=128,
      ch_mult=(1, 1, 2, 2, 4, 8),
      num_res_blocks=2,
      num_attn_blocks=16,  # 0 = the "CNN only" ablation (Tables 31-33).
      num_heads=16,
      num_registers=4,
      groups=16,  # g
      group_bits=8,  # d'
      siglu=True,  # False = identity head (the paper's baseline without SigLu).
      double_channel_downsample=True,  # False = WeTok's downsample (Tables 23/24).
      generative_decoder=True,  # concat N(0, 1) noise to the decoder input.
      entropy_temperature=0.01,
      # Entropy loss = token entropy - ratio * codebook entropy (weighted by loss.entropy).
      codebook_entropy_ratio=1.0,
      dtype="float32",
      remat=False,
      attention_impl="xla",  # jax.nn.dot_product_attention's: 'xla', or 'cudnn' on GPUs
  ))


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the UniWeTok config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "tokenizer"
  config.model = _paper_model()

  # WeTok's weights (SPECS 1); with SigLu the paper sets the commitment weight alpha to 0.
  config.loss = ml_collections.ConfigDict(dict(
      l1=1.0,
      l2=0.0,
      entropy=0.1,  # delta, on the quantizer's entropy loss (model.codebook_entropy_ratio).
      commitment=0.0,
      perceptual=1.0,  # LPIPS (VGG); needs config.lpips.path
      gan=0.1,  # generator's adversarial term; 0 trains without a discriminator
      # Eq 8: L_WeTok + theta * (L_pre + eta * L_post) + mu * L_GAP. pre_distill = theta,
      # post_distill = theta * eta, gap = mu (SPECS 1: theta = eta = mu = 1 when on); the
      # distillation terms need config.teacher.path.
      pre_distill=0.0,
      post_distill=0.0,
      gap=0.0,
  ))
  # AttnPool_pre / AttnPool_post (models/distillation_heads.py): 'linear' (ImageNet rows) or
  # 'attention' (DataComp rows, Table 6); width 0 = the teacher's pooled width.
  config.distill = ml_collections.ConfigDict(dict(head="linear", num_heads=16, width=0))
  # The Generative-Aware Prior, "BitDance-T" (models/gap_prior.py; 8.5M params at 128 bits).
  config.gap_prior = ml_collections.ConfigDict(dict(
      width=256, depth=8, num_heads=4, head_width=256, head_depth=3, head_adaln_blocks=1,
      use_query_token=True, noise_repeats=4, t_mean=-0.8, t_std=0.8, dtype="float32"))
  config.lpips = config_defaults.lpips_config()
  # WeTok's discriminator: PatchGAN 3 layers, ndf 64, BatchNorm; hinge + 0.05 LeCAM (EMA
  # 0.999); non-saturating generator loss, fixed weight (no adaptive rule), from step 0.
  # Distillation teacher (SPECS 1: SigLIP2 So400m/16 at 384): a downloaded checkpoint
  # directory, e.g. --config.teacher.path=/ckpt/siglip2-so400m-patch16-384 (README).
  config.teacher = config_defaults.teacher_config()
  config.teacher.dtype = "bfloat16"
  config.disc = config_defaults.disc_config()
  config.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-4, b1=0.5, b2=0.9, weight_decay=0.0,
      schedule="constant", warmup_steps=0, grad_clip=0.0,
      # Parameter groups (unimm_jax/train/optimizers.py): name -> dict(pattern=REGEX over
      # paths such as 'encoder/conv_in/kernel', lr_mult, weight_decay, frozen).
      groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.999  # 0 disables the parameter EMA.

  return config_defaults.apply_variants(config, arg, _VARIANTS, "configs/uniwetok.py")


def _paper(config):
  config.data.image_size = 256
  config.train.batch_size = 128
  config.train.steps = 250_250


def _demo(config):
  # The built-in data ships no LPIPS weights and 500 CPU steps are too few for a GAN;
  # `demo,gan` adds a small discriminator (README).
  config.loss.perceptual = 0.0
  config.loss.gan = 0.0
  m = config.model
  # Top width 128 like ch 32 x (1,2,2,4) but half the cost: on CPU the 64 px conv levels
  # dominate the step, so the first level is kept narrow.
  m.ch, m.ch_mult, m.num_res_blocks = 16, (1, 2, 4, 8), 1
  m.num_attn_blocks, m.num_heads = 2, 4
  config.data.source = "builtin"
  config.data.image_size = 64
  config.data.num_workers = 0
  config.optim.lr = 1e-3
  config.optim.b1 = 0.9
  config.optim.b2 = 0.99
  config.ema_decay = 0.99
  config.train.batch_size = 16
  config.train.steps = 500
  config.train.log_every = 25
  config.train.image_every = 100
  config.train.checkpoint_every = 100
  config.train.eval_every = 250
  config.train.eval_num_images = 16
  config.eval.num_images = 64
  config.eval.batch_size = 16


def _scene_classes(config):
  """`demo` at 32 px on the built-in scene classes (one coloured shape per image),
  downsampling 4 (8 x 8 tokens) with 8 groups of 4 bits: the tokens a small BitDance
  generator learns in minutes. (Downsampling 8, 4 x 4 tokens, reached 20 dB in 600 steps
  and drew most shapes as blobs of the wrong colour; this reaches 27 dB in 800.)"""
  _demo(config)
  m = config.model
  m.ch_mult = (1, 2, 4)
  m.groups, m.group_bits = 8, 4
  config.data.source = "scene_classes"
  config.data.image_size = 32
  config.train.batch_size = 32
  config.train.steps = 800
  config.train.update(dict(image_every=400, checkpoint_every=400, eval_every=400))


def _scenes(config):
  """The BitDance MLLM demo's tokenizer: `scene_classes`' model (32 px, 8 x 8 tokens of
  8 x 4 bits) on the built-in multi-object scenes the MLLM answers about, draws and edits,
  1500 steps (the scenes hold up to three objects, so more than the classes' 800)."""
  _scene_classes(config)
  config.data.source = "scenes"
  config.train.steps = 1500
  config.train.update(dict(image_every=500, checkpoint_every=500, eval_every=500))


def _tiny(config):
  config.loss.perceptual = 0.0
  config.loss.gan = 0.0
  config.disc.ndf = 8
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks = 16, (1, 2, 2), 1
  m.num_attn_blocks, m.num_heads = 1, 2
  m.groups, m.group_bits = 4, 4
  config.distill.num_heads = 2
  config.gap_prior.update(dict(width=32, depth=1, num_heads=2, head_width=32, head_depth=1,
                               noise_repeats=1))
  config.data.source = "synthetic"
  config.data.image_size = 32
  config.data.num_workers = 0
  config.optim.lr = 1e-3
  config.ema_decay = 0.9
  config_defaults.set_test_schedule(config)
  config.train.eval_num_images = 4
  config.eval.num_images = 6
  config.eval.batch_size = 4


def _gan(config):
  """Turns the GAN on (after a size variant): a narrower PatchGAN for CPU runs."""
  config.loss.gan = 0.1
  config.disc.ndf = min(config.disc.ndf, 32)


def _stage1(config):
  del config  # stage 1 is the fixed-resolution pre-training every size variant describes


def _stage2(config):
  size, batch = config.data.image_size, config.train.batch_size
  if batch % 4:
    raise ValueError(f"stage2 needs config.train.batch_size divisible by 4, got {batch}")
  config.data.resolution_buckets = f"{size}:{batch},{2 * size}:{batch // 4}"


def _stage3(config):
  if config.data.source == "builtin":
    config.data.builtin_names = "faces_text"
  config.optim.schedule = "cosine"


# ----------------------------------------------------------------------------------------
# Ablation rows: every row of UniWeTok's ablation Tables 1-7 as a config variant, from the
# appendix setting Tables 14-33.
#
# `configs/uniwetok.py:tableN_rowM` selects a row; after a size (`tiny,table1_row2`) it keeps
# that size and switches only the methods. Rows set:
#   model.siglu, model.double_channel_downsample ("bottleneck channel double"),
#   model.num_res_blocks / num_attn_blocks (Table 7 backbones), loss.pre_distill /
#   loss.post_distill (theta = eta = 1 when on, SPECS 1), distill.head, loss.gap (mu = 1 when
#   the prior model is BitDance-T), gap_prior.use_query_token, and the paper's global batch
#   (applied only at the paper's own batch of 128 or more: tiny and demo keep theirs).
# Without SigLu the commitment loss is on at WeTok's 0.25 (with SigLu the paper sets it to 0).
# Rows with a distillation term need `config.teacher.path` (ViT-SO400M-16-SigLIP2-384 in the
# paper). The training data (ImageNet-1K for Tables 1-5, DataComp-1B for 6-7) is the user's
# `config.data`; rows do not change it.
#
# Appendix Table 18 ("Post distillation", Table 2 row 2) lists pre distillation True; the
# row's name says post only. The row follows the appendix's setting table, as every row here.
# appendix table -> (siglu, pre, post, head, gap, query, batch, double_channel, res, attn)
_TABLE_SETTINGS = {
    14: (False, False, False, "linear", False, False, 128, True, 2, 16),
    15: (True, True, True, "linear", False, False, 128, True, 2, 16),
    16: (True, True, True, "linear", True, True, 128, True, 2, 16),
    17: (False, True, False, "linear", False, False, 128, True, 2, 16),
    18: (False, True, True, "linear", False, False, 128, True, 2, 16),
    19: (True, False, True, "linear", False, False, 128, True, 2, 16),
    20: (True, True, False, "linear", False, False, 128, True, 2, 16),
    21: (True, False, True, "linear", False, False, 128, True, 2, 16),
    22: (True, True, True, "linear", False, False, 128, True, 2, 16),
    23: (True, True, True, "linear", False, False, 128, False, 2, 16),
    24: (True, True, True, "linear", False, False, 128, True, 2, 16),
    25: (True, True, True, "linear", False, False, 128, True, 2, 16),
    26: (True, True, True, "linear", True, False, 128, True, 2, 16),
    27: (True, True, True, "linear", True, True, 128, True, 2, 16),
    28: (True, True, True, "linear", True, True, 128, True, 2, 0),
    29: (True, True, True, "attention", True, True, 128, True, 2, 0),
    30: (True, True, True, "attention", True, True, 1024, True, 2, 0),
    31: (True, True, True, "attention", True, True, 1024, True, 2, 0),
    32: (True, True, True, "attention", True, True, 1024, True, 0, 16),
    33: (True, True, True, "attention", True, True, 1024, True, 2, 16),
}

# Table N row M -> appendix setting table (Table 6 rows 2 and 3 are the same run).
TABLE_ROWS = {
    "table1_row1": 14, "table1_row2": 15, "table1_row3": 16,
    "table2_row1": 17, "table2_row2": 18, "table2_row3": 19,
    "table3_row1": 20, "table3_row2": 21, "table3_row3": 22,
    "table4_row1": 23, "table4_row2": 24,
    "table5_row1": 25, "table5_row2": 26, "table5_row3": 27,
    "table6_row1": 28, "table6_row2": 29, "table6_row3": 29, "table6_row4": 30,
    "table7_row1": 31, "table7_row2": 32, "table7_row3": 33,
}
_PAPER_BATCH = 128
_WETOK_COMMITMENT = 0.25


def _apply_table_setting(config: ml_collections.ConfigDict, appendix_table: int) -> None:
  """Sets the method switches of one appendix setting table on `config`."""
  (siglu, pre, post, head, gap, query, batch, double_channel, res_blocks,
   attn_blocks) = _TABLE_SETTINGS[appendix_table]
  m = config.model
  m.siglu, m.double_channel_downsample = siglu, double_channel
  # Table 7's backbones switch the ResBlocks or the attention blocks off; the size variant
  # sets how many there are otherwise.
  m.num_res_blocks = m.num_res_blocks if res_blocks else 0
  m.num_attn_blocks = m.num_attn_blocks if attn_blocks else 0
  config.loss.commitment = 0.0 if siglu else _WETOK_COMMITMENT
  config.loss.pre_distill = 1.0 if pre else 0.0
  config.loss.post_distill = 1.0 if post else 0.0
  config.loss.gap = 1.0 if gap else 0.0
  config.distill.head = head
  config.gap_prior.use_query_token = query
  if config.train.batch_size >= _PAPER_BATCH:
    config.train.batch_size = batch


_VARIANTS = {"paper": _paper, "demo": _demo, "scene_classes": _scene_classes,
             "scenes": _scenes, "tiny": _tiny,
             "gan": _gan, "stage1": _stage1, "stage2": _stage2, "stage3": _stage3,
             **{name: (lambda config, t=t: _apply_table_setting(config, t))
                for name, t in TABLE_ROWS.items()}}
