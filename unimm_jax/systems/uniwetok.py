"""UniWeTok as a system: its tokenizer spec and the two training-only modules of its loss.

  L = L_WeTok + theta * (L_pre + eta * L_post) + mu * L_GAP          (paper eq 8)

L_WeTok is the tokenizer task's pixel, perceptual and GAN terms plus the quantizer's entropy
and commitment; the rest comes from the modules here, switched on by their weights:
  `PrePostDistillation`   (config.loss.pre_distill = theta, post_distill = theta * eta):
      AttnPool_pre on U_G and AttnPool_post on U_Q (`models/distillation_heads.py`), cosine
      against the frozen teacher's pooled embedding (config.teacher, config.distill);
  `GenerativeAwarePrior`  (config.loss.gap = mu): a tiny causal BitDance over U_Q
      (`models/gap_prior.py`, config.gap_prior).
Neither is part of the tokenizer that encode/decode and exports use.
"""
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.convert import uniwetok_weights
from unimm_jax.losses import distillation
from unimm_jax.models import gap_prior
from unimm_jax.models import uniwetok
from unimm_jax.models.distillation_heads import PrePostHeads
from unimm_jax.models.tokenizer_interface import CodeLayout, TokenizerOutput, TrainingModule
from unimm_jax.systems.teacher_module import TeacherModule


def build(model_config: ml_collections.ConfigDict) -> uniwetok.UniWeTok:
  return uniwetok.UniWeTok(model_config)


def downsample_factor(model_config: ml_collections.ConfigDict) -> int:
  return uniwetok.downsample_factor(model_config)


def code_layout(model_config: ml_collections.ConfigDict) -> CodeLayout:
  """g group codes per token, 2^d' codes per group."""
  return CodeLayout(codes_per_token=model_config.groups,
                    codebook_size=2 ** model_config.group_bits)


def import_weights(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """The authors' autoencoder state dict (safetensors) -> variables {'params'}
  (`convert/uniwetok_weights`)."""
  return {'params': uniwetok_weights.load_uniwetok_state_dict(path, model_config)}


def training_modules(config: ml_collections.ConfigDict) -> list[TrainingModule]:
  modules = []
  if config.loss.pre_distill or config.loss.post_distill:
    modules.append(PrePostDistillation(config))
  if config.loss.gap:
    modules.append(GenerativeAwarePrior(config.gap_prior))
  return modules


def _zeros(struct) -> jax.Array:
  return jnp.zeros(struct.shape, struct.dtype)


class PrePostDistillation(TeacherModule):
  """Pre-Post Distillation (eqs 4-6): loss terms `pre_distill`, `post_distill` (each only
  when its weight is on). Reads features['pre_quant'] (U_G) and the latents (U_Q)."""
  name = "distillation_heads"
  # `image_embedding` embeds images for zero-shot classification (`--mode=eval`).
  provides_embedding = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config.teacher)
    if self.teacher.feature != "pooled":
      raise ValueError("Pre-Post Distillation compares pooled embeddings: set "
                       "config.teacher.feature='pooled'")
    dc = config.distill
    self.heads = PrePostHeads(
        kind=dc.head, out_dim=self.teacher.model.config.hidden_size, num_heads=dc.num_heads,
        width=dc.width or None, pre=bool(config.loss.pre_distill),
        post=bool(config.loss.post_distill))

  def init(self, rng, out, images):
    return self.heads.init(rng, _zeros(out.features["pre_quant"]), _zeros(out.latents))["params"]

  def __call__(self, params, out, images, frozen, rng):
    del rng
    u_g, u_q = self.heads.apply({"params": params}, out.features["pre_quant"], out.latents)
    target = self.target(frozen, images)
    ppd = distillation.pre_post_distillation(target, u_g, u_q)
    return {k: ppd[k] for k in ("pre_distill", "post_distill") if k in ppd}, {}

  def image_embedding(self, params, out: TokenizerOutput) -> jax.Array:
    """(b, d_T) embedding of the discrete tokens U_Q (see PrePostHeads.zero_shot_embedding)."""
    return self.heads.apply({"params": params}, out.latents,
                            method=self.heads.zero_shot_embedding)


class GenerativeAwarePrior(TrainingModule):
  """The GAP (eq 7) on the latents U_Q: loss term `gap`, statistics `gap_x_mse` and
  `gap_bit_accuracy`. Its width and depth are config.gap_prior's; its input width is the
  latents'."""
  name = "gap_prior"

  def __init__(self, prior_config: ml_collections.ConfigDict):
    self.fields = dict(prior_config)

  def _prior(self, latent_dim: int) -> gap_prior.GAPPrior:
    return gap_prior.GAPPrior(gap_prior.GAPPriorConfig(latent_dim=latent_dim, **self.fields))

  def init(self, rng, out, images):
    params_rng, noise_rng = jax.random.split(rng)
    prior = self._prior(out.latents.shape[-1])
    return prior.init({"params": params_rng, "noise": noise_rng}, _zeros(out.latents))["params"]

  def __call__(self, params, out, images, frozen, rng):
    prior = self._prior(out.latents.shape[-1])
    loss, stats = prior.apply({"params": params}, out.latents, rngs={"noise": rng})
    return {"gap": loss}, {f"gap_{k}": v for k, v in stats.items()}

