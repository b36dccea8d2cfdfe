"""MingTok as a system: its tokenizer spec and the masked feature prediction of its loss.

  L = l1 + perceptual (+ gan) + latent_prediction + semantic_prediction

(paper 2.2, configs/mingtok.py). The pixel, perceptual and GAN terms are the tokenizer
task's, on the reconstruction of the masked training pass (masked and unmasked images
alike: the pixel decoder learns to reconstruct the whole image from both). The two feature
terms come from `MaskedFeaturePrediction` modules, each a head trained beside the tokenizer
(not exported) that maps a feature of the pass to a frozen teacher's patch tokens:
  `latent_prediction`    features['latent'] (b, n, d), the normalised latents, against
                         config.teacher (DINOv2);
  `semantic_prediction`  features['semantic'] (b, n, width), the semantic decoder's output,
                         against config.semantic_teacher (CLIP);
each 1 - cos per token averaged over the masked tokens (config.prediction.on = 'masked') or
all of them ('all').
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.convert import mingtok_weights
from unimm_jax.losses import distillation
from unimm_jax.models import mingtok
from unimm_jax.models.tokenizer_interface import CodeLayout, TrainingModule
from unimm_jax.nn.mlp import Projector
from unimm_jax.systems.teacher_module import TeacherModule

PREDICT_ON = ("masked", "all")


def build(model_config: ml_collections.ConfigDict) -> mingtok.MingTok:
  return mingtok.MingTok(model_config)


def downsample_factor(model_config: ml_collections.ConfigDict) -> int:
  return mingtok.downsample_factor(model_config)


def code_layout(model_config: ml_collections.ConfigDict) -> CodeLayout | None:
  """None: MingTok's tokens are continuous latents."""
  del model_config
  return None


def import_weights(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """The authors' MingTok state dict (safetensors) -> variables {'params'}
  (`convert/mingtok_weights`)."""
  return {"params": mingtok_weights.load_mingtok_state_dict(path, model_config)}


def training_modules(config: ml_collections.ConfigDict) -> list[TrainingModule]:
  if config.prediction.on not in PREDICT_ON:
    raise ValueError(f"config.prediction.on={config.prediction.on!r} is not one of "
                     f"{PREDICT_ON}")
  modules = []
  if config.loss.latent_prediction:
    modules.append(MaskedFeaturePrediction("latent_prediction", "latent", config.teacher,
                                           "teacher", config.prediction))
  if config.loss.semantic_prediction:
    modules.append(MaskedFeaturePrediction("semantic_prediction", "semantic",
                                           config.semantic_teacher, "semantic_teacher",
                                           config.prediction))
  return modules


class PredictionHead(nn.Module):
  """(b, n, d_in) -> (b, n, out): Linear-GELU-Linear (hidden > 0) or one Linear."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.hidden:
      return Projector(self.hidden, self.out, name="mlp")(x)
    return nn.Dense(self.out, name="linear")(x)


class MaskedFeaturePrediction(TeacherModule):
  """Loss term `name`: a head on features[feature] predicts the teacher's patch tokens;
  1 - cos averaged over the masked tokens (or all). Statistic `<name>_cosine_all`: the
  mean cosine over every token, masked or not."""

  def __init__(self, name: str, feature: str, teacher_config: ml_collections.ConfigDict,
               frozen_name: str, prediction: ml_collections.ConfigDict):
    super().__init__(teacher_config, frozen_name)
    self.name, self.feature, self.on = name, feature, prediction.on
    width = self.teacher.model.config.hidden_size
    self.head = PredictionHead(prediction.hidden, width)

  def init(self, rng, out, images):
    del images
    feature = out.features[self.feature]
    return self.head.init(rng, jnp.zeros(feature.shape, feature.dtype))["params"]

  def __call__(self, params, out, images, frozen, rng):
    del rng
    target = self.target(frozen, images)
    feature = out.features[self.feature]
    if target.shape[:2] != feature.shape[:2]:
      where = ("config.teacher" if self.frozen_name == "teacher"
               else f"config.{self.frozen_name}")
      raise ValueError(f"{self.name}: the teacher gives {target.shape[1]} tokens, the "
                       f"tokenizer {feature.shape[1]}: set {where}.image_size so that its "
                       "patch grid is the latent grid")
    prediction = self.head.apply({"params": params}, feature)
    weights = out.features["token_mask"] if self.on == "masked" else jnp.ones(feature.shape[:2])
    loss = distillation.masked_cosine_loss(prediction, target, weights)
    everywhere = 1.0 - distillation.cosine_distillation_loss(prediction, target)
    return {self.name: loss}, {f"{self.name}_cosine_all": everywhere}
