"""One task for every image tokenizer: pixel, perceptual and GAN losses plus the model's aux.

A tokenizer returns `TokenizerOutput(recon, codes, latents, aux, pre_quant)`. The loss is
sum_k config.loss.<k> * term_k over `_WEIGHTED_TERMS` (reconstruction, the quantizer's
entropy and commitment from aux, LPIPS, UniWeTok's Pre-Post Distillation and Generative-Aware
Prior) plus config.loss.gan times the generator's GAN term; the remaining aux entries (code
usage, perplexity) and the prior's statistics are logged, not optimised.

UniWeTok's eq 8, L = L_WeTok + theta * (L_pre + eta * L_post) + mu * L_GAP, maps onto
config.loss.pre_distill = theta, config.loss.post_distill = theta * eta and
config.loss.gap = mu. The distillation heads (config.distill) and the prior
(config.gap_prior) train with the tokenizer's optimiser as `TrainState.aux_params`; they are
not part of the model that encode/decode and exports use. The frozen teacher
(config.teacher) is passed to the step with the other frozen networks.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unimm_jax.convert import load_pretrained
from unimm_jax.data import pipeline
from unimm_jax.evals import lpips as lpips_weights
from unimm_jax.losses import distillation
from unimm_jax.losses import gan
from unimm_jax.losses import reconstruction
from unimm_jax.models import distillation_heads
from unimm_jax.models import gap_prior
from unimm_jax.models import lpips
from unimm_jax.models import registry
from unimm_jax.models import teacher as teacher_lib
from unimm_jax.train import evaluators
from unimm_jax.train import optimizers
from unimm_jax.train.tasks import adversarial
from unimm_jax.train.train_state import TrainState, keep_if_finite

# Weighted into the reconstruction-side loss by `config.loss.<name>`; the GAN term
# (`config.loss.gan`) is added separately, optionally with the adaptive weight.
_WEIGHTED_TERMS = ("l1", "l2", "entropy", "commitment", "perceptual", "pre_distill",
                   "post_distill", "gap")

# Cotangents for the two-output VJP (numpy, so importing this module touches no device
# before jax.distributed.initialize()).
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)

# Fixed key for the decoder's noise at evaluation, so eval numbers and encode/decode
# outputs are reproducible across runs and hosts.
EVAL_NOISE_SEED = 1234


class TokenizerTask:
  """Trains a tokenizer model (UniWeTok, ...) with reconstruction and aux losses."""
  throughput_unit = "images"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = registry.build_tokenizer(config.model)
    self.tx, self.lr_schedule = optimizers.make_optimizer(config.optim, config.train.steps)
    self.adversary = adversarial.Adversary(config.disc) if config.loss.gan else None
    self.lpips = lpips.LPIPS()
    loss = config.loss
    self.teacher = self.heads = self.prior = None
    if loss.pre_distill or loss.post_distill:
      self.teacher = teacher_lib.build_teacher(config.teacher)
      if self.teacher.feature != "pooled":
        raise ValueError("Pre-Post Distillation compares pooled embeddings: set "
                         "config.teacher.feature='pooled'")
      dc = config.distill
      self.heads = distillation_heads.PrePostHeads(
          kind=dc.head, out_dim=self.teacher.model.config.hidden_size, num_heads=dc.num_heads,
          width=dc.width or None, pre=bool(loss.pre_distill), post=bool(loss.post_distill))
    if loss.gap:
      self.prior = gap_prior.GAPPrior(gap_prior.GAPPriorConfig(
          latent_dim=config.model.groups * config.model.group_bits, **config.gap_prior))

  def batch_ndims(self) -> dict[str, int]:
    return {"image": 4}

  def global_batch_sizes(self) -> list[int]:
    return [b for _, b in pipeline.train_buckets(self.config.data, self.config.train.batch_size)]

  def count_items(self, host_batch: dict) -> int:
    return host_batch["image"].shape[0]

  def train_iterator(self, seed: int):
    """This host's batches {'image': (b, h, w, 3), 'skipped': (b,)}, checkpointable."""
    return pipeline.build_train_iterator(self.config.data,
                                         global_batch_size=self.config.train.batch_size,
                                         seed=seed)

  def evaluator(self, setup, writer, workdir: str) -> evaluators.ReconstructionEvaluator:
    return evaluators.ReconstructionEvaluator(setup, writer, workdir)

  def init(self, rng: jax.Array) -> TrainState:
    """A fresh state; params stay boxed (`nn.Partitioned`) so shardings can be derived."""
    size = self.config.data.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params_rng, noise_rng, disc_rng, aux_rng = jax.random.split(rng, 4)
    variables = self.model.init({"params": params_rng, "noise": noise_rng}, images,
                                train=False)
    extra = self.adversary.init(disc_rng, images.shape) if self.adversary else None
    return TrainState.create(variables["params"], self.tx, extra=extra,
                             aux_params=self._init_aux(aux_rng, images),
                             ema=self.config.ema_decay > 0)

  def _init_aux(self, rng: jax.Array, images: jax.Array) -> dict | None:
    """Params of the training-only modules (distillation heads, prior), or None."""
    if not (self.heads or self.prior):
      return None
    side = images.shape[1] // registry.downsample_factor(self.config.model)
    m = self.config.model
    latents = jnp.zeros((1, side, side, m.groups * m.group_bits), jnp.float32)
    heads_rng, prior_rng, noise_rng = jax.random.split(rng, 3)
    aux = {}
    if self.heads:
      aux["heads"] = self.heads.init(heads_rng, latents, latents)["params"]
    if self.prior:
      aux["prior"] = self.prior.init({"params": prior_rng, "noise": noise_rng},
                                     latents)["params"]
    return aux

  def load_frozen(self) -> dict:
    """Frozen networks the loss needs (LPIPS, the teacher); passed to every step."""
    frozen = {}
    if self.config.loss.perceptual:
      lp = self.config.lpips
      frozen["lpips"] = lpips_weights.resolve_params(lp.path, allow_random=lp.allow_random)
    if self.teacher:
      dtype = self.teacher.model.config.dtype
      _, frozen["teacher"] = load_pretrained(self.config.teacher.path, param_dtype=dtype,
                                             dtype=dtype)
    return frozen

  def frozen_shapes(self) -> dict:
    """`load_frozen()` as ShapeDtypeStructs, boxed with their logical axis names (which
    place them on the mesh), reading no weights."""
    size = self.config.data.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    frozen = {}
    if self.config.loss.perceptual:
      frozen["lpips"] = jax.eval_shape(
          lambda r, x: self.lpips.init(r, x, x)["params"], rng, images)
    if self.teacher:
      dtype = self.teacher.model.config.dtype
      variables = jax.eval_shape(
          lambda r, x: self.teacher.model.init(r, *self.teacher.model_inputs(x)), rng, images)
      frozen["teacher"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype),
                                       variables)
    return frozen

  def batch_shapes(self) -> list[dict]:
    """The global train batches as ShapeDtypeStructs, one per resolution bucket."""
    return [{"image": jax.ShapeDtypeStruct((b, side, side, 3), jnp.float32)}
            for side, b in pipeline.train_buckets(self.config.data,
                                                  self.config.train.batch_size)]

  def loss_terms(self, out, images: jax.Array, frozen: dict) -> dict[str, jax.Array]:
    """Unweighted loss terms of one forward pass, each a float32 scalar."""
    aux = out.aux
    terms = {
        "l1": reconstruction.l1_loss(out.recon, images),
        "l2": reconstruction.l2_loss(out.recon, images),
        "commitment": aux["commitment"],
        "token_entropy": aux["token_entropy"],
        "codebook_entropy": aux["codebook_entropy"],
    }
    terms["entropy"] = (aux["token_entropy"]
                        - self.config.loss.codebook_entropy_ratio * aux["codebook_entropy"])
    if "lpips" in frozen:
      terms["perceptual"] = jnp.mean(
          self.lpips.apply({"params": frozen["lpips"]}, out.recon, images))
    return terms

  def aux_terms(self, aux_params, out, images: jax.Array, frozen: dict, rng: jax.Array
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(loss terms, statistics) of the training-only modules: Pre-Post Distillation against
    the teacher's pooled embedding, and the Generative-Aware Prior on the quantized latents."""
    terms, stats = {}, {}
    if self.heads:
      u_g, u_q = self.heads.apply({"params": aux_params["heads"]}, out.pre_quant, out.latents)
      target = self.teacher(frozen["teacher"], images)
      ppd = distillation.pre_post_distillation(target, u_g, u_q)
      terms.update({k: v for k, v in ppd.items() if k in ("pre_distill", "post_distill")})
    if self.prior:
      terms["gap"], prior_stats = self.prior.apply({"params": aux_params["prior"]}, out.latents,
                                                   rngs={"noise": rng})
      stats.update({f"gap_{k}": v for k, v in prior_stats.items()})
    return terms, stats

  def _losses(self, params, aux_params, state: TrainState, frozen: dict, images, rng):
    """(reconstruction-side loss, GAN generator term), (terms, statistics, recon)."""
    model_rng, aux_rng = jax.random.split(rng)
    out = self.model.apply({"params": params}, images, train=True, rngs={"noise": model_rng})
    terms = self.loss_terms(out, images, frozen)
    aux_terms, aux_stats = self.aux_terms(aux_params, out, images, frozen, aux_rng)
    terms.update(aux_terms)
    weights = self.config.loss
    nll = sum(weights[name] * terms[name] for name in _WEIGHTED_TERMS
              if weights[name] and name in terms)
    g_loss, disc_stats = (self.adversary.generator_loss(state.extra, out.recon)
                          if self.adversary else (jnp.zeros(()), None))
    stats = {k: v for k, v in out.aux.items() if k in ("code_usage", "code_perplexity")}
    stats.update(aux_stats)
    return (nll, g_loss), (terms, stats, out.recon, disc_stats)

  def train_step(self, state: TrainState, frozen: dict, batch: dict, rng: jax.Array):
    """One generator (and discriminator) update. Returns (state, metrics).

    With a discriminator, the reconstruction-side loss and the GAN term are
    differentiated separately (two VJPs of one forward pass) when the adaptive weight
    needs both gradients at the decoder's last layer; otherwise in one.
    """
    rng = jax.random.fold_in(rng, state.step)
    images = batch["image"]
    # Gradients reach the tokenizer and the training-only modules (aux_params) alike.
    (nll, g_loss), vjp, (terms, metrics, recon, disc_stats) = jax.vjp(
        lambda p, a: self._losses(p, a, state, frozen, images, rng), state.params,
        state.aux_params, has_aux=True)
    metrics.update(terms)
    extra = state.extra
    if self.adversary:
      dc = self.config.disc
      factor = gan.disc_factor_at(state.step, dc.start)
      weight = self.config.loss.gan * factor
      if dc.adaptive:
        grads_nll, grads_g = vjp((_ONE, _ZERO)), vjp((_ZERO, _ONE))
        adaptive = gan.adaptive_generator_weight(
            _at_path(grads_nll[0], dc.adaptive_layer), _at_path(grads_g[0], dc.adaptive_layer),
            dc.adaptive_max)
        grads = jax.tree.map(lambda a, b: a + weight * adaptive * b, grads_nll, grads_g)
        metrics["gan_adaptive_weight"] = adaptive
      else:
        grads = vjp((_ONE, weight))
      extra, disc_metrics = self.adversary.update(
          state.extra.replace(batch_stats=disc_stats), images, recon, factor)
      metrics.update(disc_metrics, gan=g_loss)
      loss = nll + weight * g_loss
    else:
      grads = vjp((_ONE, _ZERO))
      loss = nll
    grads, aux_grads = grads
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(aux_grads))
    new_state = state.apply_gradients(grads, self.config.ema_decay,
                                      aux_grads).replace(extra=extra)
    new_state = keep_if_finite(new_state, state, ok)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=self.lr_schedule(state.step),
                   nonfinite=(~ok).astype(jnp.int32))
    return new_state, metrics

  def reconstruct(self, params, images: jax.Array) -> jax.Array:
    """(b, h, w, 3) -> (b, h, w, 3) reconstructions clipped to [-1, 1]."""
    out = self.model.apply({"params": params}, images, train=False,
                           rngs={"noise": jax.random.key(EVAL_NOISE_SEED)})
    return jnp.clip(out.recon, -1.0, 1.0)

  def eval_step(self, state: TrainState, batch: dict) -> jax.Array:
    """Reconstructions of `batch['image']` with the EMA parameters."""
    return self.reconstruct(state.eval_params, batch["image"])

  def encode(self, params, images: jax.Array) -> jax.Array:
    """(b, h, w, 3) -> integer codes."""
    _, codes, _ = self.model.apply({"params": params}, images, train=False,
                                   method=self.model.encode)
    return codes

  def decode(self, params, codes: jax.Array) -> jax.Array:
    """Integer codes -> (b, h, w, 3) images in [-1, 1]."""
    def run(module, codes):
      return module.decode(module.codes_to_quantized(codes), train=False)
    recon = self.model.apply({"params": params}, codes, method=run,
                             rngs={"noise": jax.random.key(EVAL_NOISE_SEED)})
    return jnp.clip(recon, -1.0, 1.0)



def _at_path(tree, path: str):
  """tree['a']['b'] for path 'a/b' (e.g. the decoder's last layer kernel)."""
  for key in path.split("/"):
    if key not in tree:
      raise ValueError(f"config.disc.adaptive_layer={path!r}: no {key!r} among {sorted(tree)}")
    tree = tree[key]
  return tree
