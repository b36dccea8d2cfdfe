"""The discriminator side of the tokenizer task: its state, the generator's GAN term and its
own update, all inside the one jitted train step.

Config (`config.disc`): the discriminator (`name`, its fields), `d_loss` ('hinge' |
'non_saturating'), `g_loss` ('non_saturating' | 'hinge'), `start` (first step with a GAN
term; both losses are multiplied by 0 before it, as in taming), `lecam` weight and
`lecam_decay`, `average_patches_first` (non-saturating losses on each image's mean patch
logit, as WeTok), `r1` gamma (penalty gamma / 2 * E||grad D(x)||^2), and the discriminator's
own Adam (`lr`, `b1`, `b2`).
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimm_jax.losses import gan
from unimm_jax.models import discriminator


@flax.struct.dataclass
class DiscriminatorState:
  params: Any
  batch_stats: Any  # BatchNorm running statistics ({} for discriminators without BN)
  opt_state: Any
  lecam: gan.LeCamEma


_LOSS_NAMES = ("hinge", "non_saturating")


class Adversary:
  """Builds, applies and updates the discriminator of `config.disc`."""

  def __init__(self, disc_config: ml_collections.ConfigDict):
    for key in ("d_loss", "g_loss"):
      if disc_config[key] not in _LOSS_NAMES:
        raise ValueError(f"config.disc.{key}={disc_config[key]!r} is not one of {_LOSS_NAMES}")
    self.config = disc_config
    self.model = discriminator.build_discriminator(disc_config)
    self.tx = optax.adam(disc_config.lr, b1=disc_config.b1, b2=disc_config.b2)

  def init(self, rng: jax.Array, image_shape: tuple[int, ...]) -> DiscriminatorState:
    variables = self.model.init(rng, jnp.zeros(image_shape, jnp.float32), train=False)
    params = variables["params"]
    return DiscriminatorState(params=params, batch_stats=variables.get("batch_stats", {}),
                              opt_state=self.tx.init(params),
                              lecam=gan.LeCamEma.initial())

  def _logits(self, params, batch_stats, images):
    """Train-mode logits (batch statistics) and the updated running statistics."""
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
      logits, updates = self.model.apply(variables, images, train=True,
                                         mutable=["batch_stats"])
      return logits.astype(jnp.float32), updates["batch_stats"]
    return self.model.apply(variables, images, train=True).astype(jnp.float32), batch_stats

  def _g_loss(self, logits):
    if self.config.g_loss == "non_saturating":
      return gan.non_saturating_g_loss(logits,
                                       average_patches_first=self.config.average_patches_first)
    return gan.hinge_g_loss(logits)

  def _d_loss(self, logits_real, logits_fake):
    if self.config.d_loss == "non_saturating":
      return gan.non_saturating_d_loss(
          logits_real, logits_fake, average_patches_first=self.config.average_patches_first)
    return gan.hinge_d_loss(logits_real, logits_fake)

  def generator_loss(self, disc: DiscriminatorState, recon: jax.Array
                     ) -> tuple[jax.Array, Any]:
    """The generator's adversarial term on reconstructions (gradients reach `recon` only),
    and the BatchNorm running statistics after this train-mode pass (WeTok's generator
    step moves them too)."""
    logits, stats = self._logits(jax.lax.stop_gradient(disc.params), disc.batch_stats, recon)
    return self._g_loss(logits), jax.lax.stop_gradient(stats)

  def update(self, disc: DiscriminatorState, real: jax.Array, fake: jax.Array,
             factor: jax.Array) -> tuple[DiscriminatorState, dict[str, jax.Array]]:
    """One discriminator step on real images and (detached) reconstructions.

    `disc.batch_stats` should already hold the generator pass's update. The LeCAM EMAs
    take this step's logits before the regulariser uses them, as WeTok's code does.
    """
    fake = jax.lax.stop_gradient(fake)
    cfg = self.config

    def loss_fn(params):
      logits_real, stats = self._logits(params, disc.batch_stats, real)
      logits_fake, stats = self._logits(params, stats, fake)
      d_loss = self._d_loss(logits_real, logits_fake)
      ema = gan.update_lecam_ema(disc.lecam, logits_real, logits_fake, cfg.lecam_decay)
      lecam = gan.lecam_regularizer(logits_real, logits_fake, ema.real, ema.fake)
      total = d_loss + cfg.lecam * lecam
      if cfg.r1:
        r1 = gan.r1_penalty(
            lambda x: self._logits(params, disc.batch_stats, x)[0], real)
        total = total + 0.5 * cfg.r1 * r1
      else:
        r1 = jnp.zeros(())
      aux = dict(d_loss=d_loss, lecam=lecam, r1=r1, logits_real=jnp.mean(logits_real),
                 logits_fake=jnp.mean(logits_fake))
      return factor * total, (stats, ema, aux)

    grads, (stats, ema, aux) = jax.grad(loss_fn, has_aux=True)(disc.params)
    updates, opt_state = self.tx.update(grads, disc.opt_state, disc.params)
    new = DiscriminatorState(params=optax.apply_updates(disc.params, updates),
                             batch_stats=stats, opt_state=opt_state,
                             lecam=jax.lax.stop_gradient(ema))
    return new, {f"disc/{k}": v for k, v in aux.items()}
