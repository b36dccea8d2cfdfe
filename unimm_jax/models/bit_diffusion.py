"""BitDance's binary diffusion head, its loss and its sampler (SPECS 1; UniWeTok paper sec 4).

A generator writes binary tokens (d bits each, in {-1, +1}) by denoising them in continuous
space from its transformer's hidden states, then taking sign(). One network serves every
user: the GAP prior of UniWeTok (`models.gap_prior`), BitDance's class-to-image model
(`models.bitdance`) and its MLLM.

The head (`BitDiffusionHead`, x-prediction): input (n, m, d) noisy tokens z_t, one timestep per
token (n, m), one condition per token (n, m, c) -> an estimate of the clean tokens x.
- serial head (`attention_heads` 0, their diff_head.py `MlpEncoder`): residual adaLN SwiGLU
  blocks applied to each token alone; a row is any set of tokens;
- parallel head (`attention_heads` > 0, their diff_head_parallel.py / flow_head_parallel_x.py
  `TransEncoder`): adaLN transformer blocks whose attention spans the m tokens of a row, so a
  row is one block of P tokens denoised jointly (one t per block).
Both: y = silu(TimestepEmbedder(t) + Linear(cond)); consecutive blocks share one
zero-initialised adaLN projection (`adaln_blocks` of them); final adaLN LayerNorm and a
zero-initialised linear (`unimm_jax.nn.adaln.adaln_mlp`). `bounded`: the output goes through
2 sigmoid - 1 into (-1, 1), as the MLLM's flow_head_parallel_x.py does (the issue's choice and
the GAP prior's); their ImageNet heads return it unbounded (`bounded=False`).

Their two parallel heads differ only in: heads of 64 channels (ImageNet) or 128 (MLLM):
`attention_heads` = width // 64 or width // 128; the MLLM's block MLP is a SwiGLU with
use_swiglu (their 14B configs) or else Linear-SiLU-Linear of hidden 1.5 width (`swiglu`);
the bound. Both take one t per row (ours per token: a row's t must then be constant), embed
it as [cos, sin] of 1000 t (256 frequencies), use LayerNorm eps 1e-6, no RoPE and no q/k
norm; for rows of more than 32 tokens the MLLM's attention is flash attention, the same
softmax. `unimm_jax.convert.bitdance_mllm_weights` imports the MLLM head's weights.

The loss (`denoising_loss`): every target is denoised at `repeats` independent (t, eps) draws
(their diff_batch_mul); t = time_shift(sigmoid(mean + std N(0, 1))); z_t = (1 - t) eps + t x;
MSE between the velocities implied by the prediction and by x, (x - z_t) / max(1 - t, 0.05)
(`unimm_jax.losses.diffusion`).

The sampler (`euler_maruyama`, their sampling_parallel.py): t runs over
time_shift(linspace(0, 1 - last_step, num_steps + 1)); at each t, v = (x_hat - z) /
max(1 - t, 0.05) (guided: v_u + s (v_c - v_u), `guided_velocity`), score = (t v - z) / (1 - t)
(their (alpha/alpha') v - z over sigma^2 - (alpha/alpha') sigma' sigma, which is 1 - t here),
z <- z + (v + (1 - t) score) dt + sqrt(2 (1 - t) dt) N(0, I); then one Euler step of
last_step from t = 1 - last_step. An exact x-predictor makes that last step land on x_hat.
`cfg_scale_at` is the class-to-image guidance schedule over token positions ('linear': 1 at
the first block, rising to s; 'constant').
"""
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.losses import diffusion
from unimm_jax.nn.adaln import adaln_mlp

Dtype = Any
CFG_SCHEDULES = ('linear', 'constant')
LAST_STEP = 0.05

# (z (n, m, d), t (n, m), cond (n, m, c)) -> x estimate (n, m, d) float32.
Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (z (n, m, d), t () float32) -> velocity (n, m, d) float32.
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


class BitDiffusionHead(nn.Module):
  """See the module docstring. Shapes: z_t (n, m, d), t (n, m), cond (n, m, c) -> (n, m, d)
  float32.

  width, depth, adaln_blocks: the stack (adaln_blocks divides depth).
  attention_heads: 0 = serial (per-token) head; > 0 = parallel head with that many heads.
  mlp_bias: biases in the SwiGLUs (BitDance's heads have them; the GAP prior's do not).
  bounded: x estimate through 2 sigmoid - 1.
  swiglu: False replaces each block's SwiGLU by Linear-SiLU-Linear with biases (their MLLM
    head with use_swiglu False).
  """
  width: int
  depth: int
  adaln_blocks: int
  attention_heads: int = 0
  mlp_bias: bool = True
  bounded: bool = True
  dtype: Dtype = jnp.float32
  swiglu: bool = True

  @nn.compact
  def __call__(self, z_t: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
    chex.assert_rank([z_t, t, cond], [3, 2, 3])
    out = adaln_mlp(z_t, t, cond, width=self.width, depth=self.depth,
                    out_features=z_t.shape[-1], dtype=self.dtype,
                    adaln_blocks=self.adaln_blocks, mlp_bias=self.mlp_bias,
                    attention_heads=self.attention_heads,
                    swiglu=self.swiglu).astype(jnp.float32)
    return 2.0 * jax.nn.sigmoid(out) - 1.0 if self.bounded else out


def denoising_loss(denoise: Denoiser, targets: jax.Array, cond: jax.Array, rng: jax.Array, *,
                   repeats: int = 1, t_mean: float = diffusion.P_MEAN,
                   t_std: float = diffusion.P_STD, shift: float = 1.0,
                   t_per_row: bool = False, row_weights: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BitDance's clamped v-loss of `denoise` on clean `targets`.

  Args:
    denoise: the head (a bound module or its apply), see `Denoiser`.
    targets: (n, m, d) clean tokens, float32 in {-1, +1} (any reals work).
    cond: (n, m, c) the head's conditions.
    rng: key for t and eps.
    repeats: (t, eps) draws per target, stacked on the row axis.
    t_mean, t_std, shift: t = time_shift(sigmoid(t_mean + t_std N(0, 1)), shift).
    t_per_row: one t per row (a parallel head's block) instead of one per token.
    row_weights: (n,) weights of the rows (0 leaves a padding row out): the loss and
      metrics are then the weighted means over rows; None weighs every row 1.
  Returns:
    (float32 scalar loss, metrics): `x_mse` of the estimate and `bit_accuracy` (sign agrees
    with the target) at the drawn timesteps, for logging.
  """
  chex.assert_rank([targets, cond], 3)
  cond = jnp.tile(cond, (repeats, 1, 1))
  targets = jnp.tile(targets.astype(jnp.float32), (repeats, 1, 1))
  t_key, eps_key = jax.random.split(rng)
  n, m = targets.shape[:2]
  t = diffusion.sample_logit_normal_t(t_key, (n, 1) if t_per_row else (n, m), t_mean, t_std)
  t = jnp.broadcast_to(diffusion.time_shift(t, shift), (n, m))
  eps = jax.random.normal(eps_key, targets.shape, jnp.float32)
  z_t = diffusion.flow_interpolate(targets, eps, t[..., None])
  pred = denoise(z_t, t, cond)
  if row_weights is None:
    weights = None
    loss = diffusion.x_prediction_velocity_loss(pred, targets, z_t, t[..., None])
  else:
    weights = jnp.broadcast_to(jnp.tile(jnp.asarray(row_weights, jnp.float32), repeats)[:, None],
                               (n, m))
    loss = diffusion.velocity_loss(diffusion.velocity(pred, z_t, t[..., None]),
                                   diffusion.velocity(targets, z_t, t[..., None]), weights)
  pred, targets = jax.lax.stop_gradient(pred), jax.lax.stop_gradient(targets)
  agree = (jnp.sign(pred) == jnp.sign(targets)).astype(jnp.float32)
  metrics = {'x_mse': _token_mean(jnp.square(pred - targets), weights),
             'bit_accuracy': _token_mean(agree, weights)}
  return loss, metrics


def _token_mean(x: jax.Array, weights: jax.Array | None) -> jax.Array:
  """x (n, m, d) -> its mean, or with weights (n, m) the weighted mean of its tokens."""
  if weights is None:
    return jnp.mean(x)
  return jnp.sum(weights * jnp.mean(x, axis=-1)) / jnp.maximum(jnp.sum(weights), 1e-12)


def cfg_scale_at(scale: float, position: jax.Array | int, num_positions: int,
                 schedule: str = 'linear') -> jax.Array:
  """The guidance scale at token (or block) `position` of `num_positions`: 'constant' is
  `scale`; 'linear' is 1 + (scale - 1) position / num_positions (1 at the first position).
  A scale <= 1 is returned as given (no guidance)."""
  if schedule not in CFG_SCHEDULES:
    raise ValueError(f'cfg schedule {schedule!r} is not one of {CFG_SCHEDULES}')
  position = jnp.asarray(position, jnp.float32)
  if schedule == 'constant' or scale <= 1.0:
    return jnp.full((), scale, jnp.float32)
  return 1.0 + (scale - 1.0) * position / num_positions


def guided_velocity(denoise: Denoiser, cond: jax.Array, uncond: jax.Array | None,
                    scale: jax.Array | float = 1.0) -> VelocityFn:
  """The velocity field of `denoise` under `cond` (n, m, c); with `uncond` (n, m, c),
  guided: v_u + scale (v_c - v_u), both streams evaluated in one batch of 2n rows."""

  def velocity_fn(z, t):
    rows = jnp.full(z.shape[:2], t, jnp.float32)
    if uncond is None:
      return diffusion.velocity(denoise(z, rows, cond), z, rows[..., None])
    both = jnp.concatenate([z, z])
    rows2 = jnp.concatenate([rows, rows])
    v = diffusion.velocity(denoise(both, rows2, jnp.concatenate([cond, uncond])), both,
                           rows2[..., None])
    v_c, v_u = jnp.split(v, 2)
    return v_u + scale * (v_c - v_u)

  return velocity_fn


def euler_maruyama(velocity_fn: VelocityFn, rng: jax.Array, shape: tuple[int, ...], *,
                   num_steps: int, shift: float = 1.0, last_step: float = LAST_STEP,
                   temperature: float = 1.0) -> jax.Array:
  """Samples (n, m, d) float32 tokens by the module docstring's SDE from N(0, temperature^2).

  Step i's noise is `fold_in(noise_key, i)`, the start `split(rng)[0]`: a sample is a
  function of `rng` alone.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps} must be >= 1')
  start_key, noise_key = jax.random.split(rng)
  grid = diffusion.time_shift(jnp.linspace(0.0, 1.0 - last_step, num_steps + 1,
                                           dtype=jnp.float32), shift)

  def step(i, z):
    t, dt = grid[i], grid[i + 1] - grid[i]
    v = velocity_fn(z, t)
    score = (t * v - z) / (1.0 - t)
    drift = v + (1.0 - t) * score
    noise = jax.random.normal(jax.random.fold_in(noise_key, i), z.shape, jnp.float32)
    return z + drift * dt + jnp.sqrt(2.0 * (1.0 - t) * dt) * noise

  z = temperature * jax.random.normal(start_key, shape, jnp.float32)
  z = jax.lax.fori_loop(0, num_steps, step, z)
  return z + velocity_fn(z, jnp.float32(1.0 - last_step)) * last_step
