"""Adversarial losses and regularisers as pure functions; every result is a float32 scalar.

Logits are any shape with the batch first: PatchGAN maps (b, h', w', 1) or a single logit per
image (b, 1). Unless a function says otherwise it averages over every element, i.e. over the
batch and the patches alike, as the taming losses do.

Facts from the authors' code (WeTok src/WeTok/modules/losses/vqperceptual.py, EvoTok
evotok/tokenizer/modules/vq_loss.py):
- hinge D loss = 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) in both; hinge G loss
  = -mean(fake) (EvoTok's `hinge_gen_loss`, its default generator loss).
- WeTok's generator loss (weight 0.1) is non-saturating on each image's mean patch logit:
  softplus(-mean_patches(fake)) averaged over the batch (`non_saturate_gen_loss`); hence
  `average_patches_first=True` here. WeTok's discriminator uses hinge + LeCAM.
- LeCAM (`LeCAM_EMA`, `lecam_reg`): the two EMAs start at 0, decay 0.999, and track the batch
  mean of the real and fake logits (detached). In the discriminator step WeTok first updates
  the EMAs with the current logits and then computes the regulariser with the updated EMAs;
  the total is disc_factor * (hinge + 0.05 * LeCAM). Under DDP each of their GPUs kept its own
  EMAs of its share of the batch; here the batch means are global, so every device agrees.
- Adaptive weight (`calculate_adaptive_weight`, EvoTok's too): ||g_nll|| / (||g_gan|| + 1e-4)
  clamped to [0, 1e4] and detached; WeTok's configs set a fixed generator weight instead, and
  EvoTok's default has it off.
- `adopt_weight`: the GAN factor is 0 while step < start, so it is on from step == start.
"""
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _per_sample_mean(logits: jax.Array) -> jax.Array:
  """(b, ...) -> (b,): each image's mean logit over its patches."""
  logits = _f32(logits)
  return jnp.mean(logits.reshape(logits.shape[0], -1), axis=1)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - real) + mean relu(1 + fake)).

  The 0.5 is taming's (and WeTok's and EvoTok's): it makes the loss the average of the real
  and fake terms, so its scale matches a one-sided loss.
  """
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean(fake): the generator raises the discriminator's score of its outputs."""
  return -jnp.mean(_f32(logits_fake))


def non_saturating_d_loss(logits_real: jax.Array, logits_fake: jax.Array, *,
                          average_patches_first: bool = False) -> jax.Array:
  """0.5 * (mean softplus(-real) + mean softplus(fake)): binary cross-entropy with real = 1.

  taming's `vanilla_d_loss`. `average_patches_first` averages each image's patch logits
  before the softplus (WeTok's `non_saturate_discriminator_loss` does, without the 0.5).
  """
  if average_patches_first:
    logits_real, logits_fake = _per_sample_mean(logits_real), _per_sample_mean(logits_fake)
  return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real)))
                + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def non_saturating_g_loss(logits_fake: jax.Array, *,
                          average_patches_first: bool = False) -> jax.Array:
  """mean softplus(-fake) = -mean log sigmoid(fake).

  Unlike log(1 - sigmoid(fake)) its gradient does not vanish while the discriminator still
  rejects the fakes. WeTok's generator loss is the `average_patches_first=True` form:
  softplus(-mean over patches) per image, then the batch mean; the two agree for one logit
  per image.
  """
  if average_patches_first:
    logits_fake = _per_sample_mean(logits_fake)
  return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


@flax.struct.dataclass
class LeCamEma:
  """Exponential moving averages of the discriminator's mean real and fake logits."""
  real: jax.Array
  fake: jax.Array

  @classmethod
  def initial(cls) -> 'LeCamEma':
    """Both averages at 0, as WeTok's `LeCAM_EMA(init=0.)` (no bias correction)."""
    return cls(real=jnp.zeros((), jnp.float32), fake=jnp.zeros((), jnp.float32))


def update_lecam_ema(ema: LeCamEma, logits_real: jax.Array, logits_fake: jax.Array,
                     decay: float = 0.999) -> LeCamEma:
  """ema <- decay * ema + (1 - decay) * mean(logits), for real and fake; no gradient.

  The mean is over every element of the logits (batch and patches), as WeTok's
  `torch.mean(logits).item()`.
  """
  real = jax.lax.stop_gradient(jnp.mean(_f32(logits_real)))
  fake = jax.lax.stop_gradient(jnp.mean(_f32(logits_fake)))
  return LeCamEma(real=decay * ema.real + (1.0 - decay) * real,
                  fake=decay * ema.fake + (1.0 - decay) * fake)


def lecam_regularizer(logits_real: jax.Array, logits_fake: jax.Array, ema_real: jax.Array,
                      ema_fake: jax.Array) -> jax.Array:
  """mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2) (LeCAM, Tseng et al. 2021).

  Pulls the real logits down towards the running fake mean and the fake logits up towards the
  running real mean, only from the side where they have drifted past it, which keeps the
  discriminator's predictions bounded when it would otherwise overfit. The EMAs are constants
  (no gradient). To match WeTok, pass the EMAs already updated with this step's logits.
  """
  ema_real, ema_fake = jax.lax.stop_gradient(_f32(ema_real)), jax.lax.stop_gradient(
      _f32(ema_fake))
  return (jnp.mean(jnp.square(jax.nn.relu(_f32(logits_real) - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - _f32(logits_fake)))))


def r1_penalty(disc_apply_fn: Callable[[jax.Array], jax.Array],
               real_images: jax.Array) -> jax.Array:
  """mean over the batch of ||d D(x) / d x||^2 (squared norm summed over h, w, c).

  `disc_apply_fn` maps images (b, h, w, c) to logits with the batch first; the gradient is
  that of the sum of all logits, so an image's gradient is that of its own logits (summed over
  its patches) as long as samples do not interact. BatchNorm in training mode and the
  minibatch stddev layer couple the samples, so their cross terms enter too; R1 is normally
  paired with the StyleGAN discriminator without them.

  The weight is the caller's: StyleGAN2 adds (gamma / 2) * r1_penalty(...) to the
  discriminator loss.
  """
  real_images = _f32(real_images)
  grads = jax.grad(lambda x: jnp.sum(_f32(disc_apply_fn(x))))(real_images)
  per_sample = jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=1)
  return jnp.mean(per_sample)


def adaptive_generator_weight(nll_grads_last_layer, g_grads_last_layer,
                              max_weight: float = 1e4) -> jax.Array:
  """VQGAN's adaptive GAN weight: ||grad nll|| / (||grad g|| + 1e-4), clipped to
  [0, max_weight], without gradient.

  Both arguments are the gradients of the two losses (the reconstruction + perceptual "nll"
  and the generator's adversarial loss) with respect to the same parameter, the decoder's last
  layer's weight in taming; the caller computes them (arrays, or pytrees whose global norm is
  used). The weight balances the two gradients' magnitudes at that layer; taming multiplies
  it by a further constant discriminator weight, which stays with the caller.
  """
  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(x))) for x in jax.tree.leaves(tree)))

  weight = norm(nll_grads_last_layer) / (norm(g_grads_last_layer) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def disc_factor_at(step: jax.Array | int, start: jax.Array | int) -> jax.Array:
  """1.0 from `start` on, 0.0 before it (float32; `step` may be traced)."""
  return jnp.where(jnp.asarray(step) >= start, 1.0, 0.0).astype(jnp.float32)
