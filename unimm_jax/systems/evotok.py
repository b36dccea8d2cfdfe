"""EvoTok as a system: its tokenizer spec and the semantic alignment of its loss.

  L = L2 + LPIPS + 0.5 GAN (from step 20000) + commitment + (1 - cos) + (1 - cos over 4 folds)

(SPECS 2, the authors' weights.) The pixel, perceptual and GAN terms are the tokenizer task's;
`commitment` comes from the residual quantizer; the two cosine terms from
`SemanticAlignment`, which compares the semantic decoder's output (features['semantic'],
computed on f_sem = the first L_sem levels) with the frozen teacher's features of the same
images (config.teacher, `hidden:-2` as the authors read SigLIP2): `semantic` weights the
plain cosine, `semantic_fold` the one over 4 chunks of the width.
"""
import ml_collections

from unimm_jax.convert import evotok_weights
from unimm_jax.convert import pretrained
from unimm_jax.losses import distillation
from unimm_jax.models import evotok
from unimm_jax.models.tokenizer_interface import CodeLayout, TrainingModule
from unimm_jax.systems.teacher_module import TeacherModule

SEMANTIC_FOLDS = 4  # the authors' `cosine+fold` loss: 4 chunks (of 256 at width 1024)


def build(model_config: ml_collections.ConfigDict) -> evotok.EvoTok:
  return evotok.EvoTok(model_config)


def downsample_factor(model_config: ml_collections.ConfigDict) -> int:
  return evotok.downsample_factor(model_config)


def code_layout(model_config: ml_collections.ConfigDict) -> CodeLayout:
  """All L residual codes per token (the first L_pix of them decode to pixels; decoupled:
  L_pix pixel codes, then L_sem semantic ones)."""
  return CodeLayout(codes_per_token=model_config.num_levels,
                    codebook_size=model_config.codebook_size)


def trajectory_levels(model_config: ml_collections.ConfigDict) -> int:
  """`--mode=eval` evaluates the sum of the first d levels for every d = 1..L (0: a
  decoupled variant, which has no single trajectory)."""
  return model_config.num_levels if model_config.decoupling == "evolution" else 0


def import_weights(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """The authors' EvoTok state dict (safetensors) -> variables {'params',
  'quantizer_state'} (`convert/evotok_weights`)."""
  return evotok_weights.load_evotok_state_dict(path, model_config)


def initial_weights(model_config: ml_collections.ConfigDict) -> dict | None:
  """A fresh run's encoder from config.model.encoder.init_path (a transformers `siglip`
  directory, the layout of SigLIP2's fixed-resolution checkpoints, as the authors start
  from siglip2-large-patch16-256): its embeddings and all its blocks but the last, which the
  model does not build (models/evotok.py); the branch-wise variant's second encoder starts
  from the same weights. None without a path."""
  path = model_config.encoder.init_path
  if not path:
    return None
  sources = pretrained.starting_sources(
      path, evotok.encoder_config(model_config), where="config.model.encoder.init_path",
      ignore=("num_layers", "use_head", "final_norm"))
  blocks = sum(key.startswith("layers_") for key in sources)
  if blocks != model_config.encoder.num_layers:
    raise ValueError(f"config.model.encoder.init_path={path!r} has {blocks} layers, "
                     f"config.model.encoder.num_layers={model_config.encoder.num_layers}")
  unused = ("final_norm", "head", f"layers_{blocks - 1}")
  encoder = {key: value for key, value in sources.items() if key not in unused}
  if model_config.decoupling == "branch":
    return {"encoder": encoder, "pixel_encoder": encoder}
  return {"encoder": encoder}


def training_modules(config: ml_collections.ConfigDict) -> list[TrainingModule]:
  if config.loss.semantic or config.loss.semantic_fold:
    return [SemanticAlignment(config)]
  return []


class SemanticAlignment(TeacherModule):
  """Loss terms `semantic` (mean 1 - cos per token) and `semantic_fold` (the same over
  SEMANTIC_FOLDS chunks), each only when its weight is on; no params of its own (the
  semantic decoder is part of the tokenizer: the MLLM reads it)."""
  name = "semantic_alignment"
  aligned_feature = "semantic"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config.teacher)
    self.weights = config.loss

  def init(self, rng, out, images):
    del rng, out, images
    return {}

  def __call__(self, params, out, images, frozen, rng):
    del params, rng
    target = self.target(frozen, images)
    semantic = out.features["semantic"]
    if target.shape != semantic.shape:
      raise ValueError(f"the teacher gives features {target.shape}, the semantic decoder "
                       f"{semantic.shape}: config.model.semantic.out_width must be the "
                       "teacher's width and its patch grid the encoder's")
    losses = {}
    if self.weights.semantic:
      losses["semantic"] = distillation.cosine_distillation_loss(semantic, target)
    if self.weights.semantic_fold:
      losses["semantic_fold"] = distillation.folded_cosine_loss(semantic, target,
                                                                SEMANTIC_FOLDS)
    return losses, {}
