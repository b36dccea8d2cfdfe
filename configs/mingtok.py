"""MingTok: the continuous unified tokenizer (../shared/papers/mingtok.txt section 2, SPECS 4).

Variants (comma-separated, applied in order): `paper` (512 px, 256 tokens of 32 dims, Table 1;
the default), `demo` (CPU: 64 px photos), `scenes` (CPU: 32 px built-in scenes, the tokenizer
of Ming-UniVision's demo), `tiny` (tests), and the switches `no_masking`
(plain feature distillation and reconstruction), `latent_only` / `semantic_only` (one
feature-prediction target), `gan` (the optional adversarial term).

  python -m unimm_jax.main --config=configs/mingtok.py:paper --workdir=W \\
      --config.teacher.path=/ckpt/dinov2-large --config.semantic_teacher.path=/ckpt/clip-vit-large-patch14 \\
      --config.lpips.path=/ckpt/lpips_vgg.safetensors --config.data.source=folder ...

The loss (paper 2.2; the authors released no training code, so what the paper leaves open is
ours and documented here):
  l1 + perceptual (LPIPS)                      the whole image, from masked and unmasked inputs
  + latent_prediction   1 - cos(head(z), DINOv2 tokens) on masked tokens   (config.teacher)
  + semantic_prediction 1 - cos(head(f), CLIP tokens) on masked tokens     (config.semantic_teacher)
  (+ gan, optional)
The heads (`config.prediction`) are MLPs trained beside the tokenizer and not exported.
Teachers must give one token per latent: at 512 px / 32 a 16 x 16 grid, which DINOv2 and CLIP
ViT-L/14 give at 224 px (their image_size below).
"""
import ml_collections

from unimm_jax import config_defaults


def _paper_model() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="mingtok",
      image_size=512,  # the learned position grid's side (other sizes resize it)
      latent_dim=32,
      # The released latents' normalisation: latents = (z - mean) / scale.
      latent_mean=1.46817409,
      latent_scale=8.09449291,
      # Table 1; heads are 64 wide (width // 64 heads), SwiGLU hidden round_up_8(8 w / 3).
      encoder=ml_collections.ConfigDict(dict(width=768, depth=12, mlp_ratio=4, patch_size=32)),
      semantic=ml_collections.ConfigDict(dict(width=1024, depth=24, mlp_ratio=4)),
      pixel=ml_collections.ConfigDict(dict(width=1024, depth=24, mlp_ratio=4, patch_size=16)),
      # Masked feature prediction (the paper gives no numbers): `ratio` of the patch tokens
      # of an `image_fraction` of the images are masked at the encoder's input; the rest of
      # the batch trains unmasked (the pixel decoder learns both conditions).
      mask=ml_collections.ConfigDict(dict(ratio=0.5, image_fraction=0.5)),
      dtype="bfloat16",  # compute dtype (params stay float32), as the authors' autocast
      remat=False,
      attention_impl="xla",
  ))


def get_config(arg: str = "paper") -> ml_collections.ConfigDict:
  """Returns the MingTok config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "tokenizer"
  config.model = _paper_model()
  config.loss = ml_collections.ConfigDict(dict(
      l1=1.0,  # the authors' pixel decoder loss type 'L1-plain'
      l2=0.0,
      perceptual=1.0,  # LPIPS (VGG); needs config.lpips.path
      gan=0.0,  # optional (paper 2.2); `gan` turns it on
      latent_prediction=1.0,  # masked DINOv2 feature prediction at the latents
      semantic_prediction=1.0,  # masked CLIP feature prediction at the semantic features
  ))
  # Prediction heads: Linear-GELU-Linear from the latent / semantic width to the teacher's
  # width (hidden 0: a single Linear). `on`: 'masked' tokens (the paper) or 'all' tokens.
  config.prediction = ml_collections.ConfigDict(dict(hidden=1024, on="masked"))
  config.lpips = config_defaults.lpips_config()
  # The latent's teacher (paper: DINOv2): its last layer's patch tokens (after the final
  # LayerNorm), at 224 px for ViT-L/14's 16 x 16 grid.
  config.teacher = config_defaults.teacher_config()
  config.teacher.update(dict(feature="last", drop_class_token=True, image_size=224))
  # The semantic features' teacher (paper: CLIP): the second-to-last layer's patch tokens,
  # the layer LLaVA-style MLLMs read, at 224 px.
  config.semantic_teacher = config_defaults.teacher_config()
  config.semantic_teacher.update(dict(feature="hidden:-2", drop_class_token=True,
                                      image_size=224))
  config.disc = config_defaults.disc_config(
      n_layers=3, ndf=64, d_loss="hinge", g_loss="hinge", start=20000, lecam=0.0,
      adaptive=False, lr=1e-4, b1=0.9, b2=0.95)
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.05, schedule="cosine",
      warmup_steps=5000, grad_clip=1.0, groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.0
  config.data.image_size = 512
  config.train.batch_size = 256
  config.train.steps = 500_000
  return config_defaults.apply_variants(config, arg, _VARIANTS, "configs/mingtok.py")


def _paper(config):
  del config  # get_config's defaults are the paper's


def _small(config, *, size: int, patch: int, latent_dim: int, width: int, depth: int):
  """A CPU-sized MingTok on `size` px images, tokens of `patch` px, every stage `width` wide
  and `depth` deep; the pixel decoder's patches are half the encoder's (2 x 2 per token)."""
  m = config.model
  m.update(dict(image_size=size, latent_dim=latent_dim, dtype="float32"))
  m.encoder.update(dict(width=width, depth=depth, patch_size=patch))
  m.semantic.update(dict(width=width, depth=depth))
  m.pixel.update(dict(width=width, depth=depth, patch_size=patch // 2))
  config.prediction.hidden = 2 * width
  config.loss.perceptual = 0.0
  config.disc.ndf = 8
  config.data.image_size = size
  config.data.num_workers = 0


def _tiny(config):
  """32 px, 4 x 4 tokens of 8 dims, one block per stage. Tests write tiny random DINOv2 and
  CLIP teachers (32 px, patch 8) and set both teacher paths."""
  _small(config, size=32, patch=8, latent_dim=8, width=64, depth=1)
  config.teacher.image_size = config.semantic_teacher.image_size = 0  # the checkpoints' own
  config.data.source = "synthetic"
  config_defaults.set_test_schedule(config)
  config.eval.update(dict(num_images=8, batch_size=4))  # --mode=eval, not 50,000 images


def _demo(config):
  """64 px crops of scikit-image's photos (held-out photos for eval), 8 x 8 tokens of 16
  dims, two blocks of width 128 per stage. No teacher weights ship offline, so the feature
  prediction terms are off (set both teacher paths and weights to turn them on); the masked
  and unmasked reconstruction trains as in the paper. Adam 1e-3, batch 16, 1500 steps."""
  _small(config, size=64, patch=8, latent_dim=16, width=128, depth=2)
  config.loss.latent_prediction = config.loss.semantic_prediction = 0.0
  config.data.source = "builtin"
  config.optim.update(dict(name="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
                           warmup_steps=0))
  config.train.update(dict(batch_size=16, steps=1500, log_every=50, image_every=500,
                           checkpoint_every=500, eval_every=500, eval_num_images=16))
  config.eval.update(dict(num_images=64, batch_size=16))


def _scenes(config):
  """Ming-UniVision's demo tokenizer: 32 px built-in scenes with 4 px patches (8 x 8 latents
  of 16 dims; a shape of about 5 px would share an 8 px patch with background), two blocks
  of width 128 per stage, 1500 steps; no teacher, as `demo`."""
  _demo(config)
  _small(config, size=32, patch=4, latent_dim=16, width=128, depth=2)
  config.data.source = "scenes"


def _no_masking(config):
  """Ablation: no masking, so feature prediction becomes plain distillation on every token."""
  config.model.mask.ratio = 0.0
  config.prediction.on = "all"


def _only(term: str):
  def apply(config):
    other = "semantic_prediction" if term == "latent_prediction" else "latent_prediction"
    config.loss[other] = 0.0
  return apply


def _gan(config):
  config.loss.gan = 0.1


_VARIANTS = {
    "paper": _paper,
    "demo": _demo,
    "tiny": _tiny,
    "scenes": _scenes,
    "no_masking": _no_masking,
    "latent_only": _only("latent_prediction"),
    "semantic_only": _only("semantic_prediction"),
    "gan": _gan,
}
