"""Ming-UniVision's per-token rectified-flow head and its Euler sampler (SPECS section 4).

The LLM's hidden state at an image position conditions a small adaLN MLP that predicts the
velocity of one 32-d MingTok latent (normalised: (z - mean) / scale); sampling integrates
that velocity from noise in 16 Euler steps, with classifier-free guidance over up to three
LLM streams.

Facts from the authors' code (inclusionAI/Ming-UniVision at 3bbdd2f,
mingunivision/diff_loss_rf_swiglu.py `RectifiedFlowLoss`, `SimpleMLPAdaLN`; the condition and
the sizes from modeling_bailing_moe.py `setup_vishead_diffloss`; the call from
`forward_for_image_generation_inner` / `generate_image`):
- condition: `vis_head` = Linear(LLM width -> 3072) then LayerNorm(eps 1e-6, affine), run
  once per token; the head's own `cond_embed` Linear(3072 -> 3072) follows it;
- head: input_proj Linear(32 -> 3072); timestep: 1000 t -> [cos, sin] sinusoid of 256
  (max period 10000) -> Linear, SiLU, Linear; y = t_emb + cond_emb; 12 residual blocks
  x + gate * SwiGLU(LN(x) (1 + scale) + shift), LN eps 1e-6 with affine params, the SwiGLU
  fused (w12: first half gate, second half up), biases everywhere, hidden
  (int(3072 * 4 * 2 / 3) + 7) // 8 * 8 = 8192; each block its own adaLN Linear of silu(y)
  to (shift, scale, gate); final layer: affine-free LN (eps 1e-6) modulated by a Linear of
  silu(y) to (shift, scale), then Linear(3072 -> 32): the raw velocity (no squashing);
  adaLN and final layers zero-initialised, the other Linears Xavier-uniform, the timestep
  MLP N(0, 0.02) (`unimm_jax.nn.adaln.adaln_mlp` builds exactly this);
- t direction and target: the sampler starts from noise at t = 1 and adds v * dt while t
  falls to 0, so t = 1 is noise, t = 0 data and v = data - noise
  (`unimm_jax.losses.diffusion.rectified_flow_path` / `rectified_flow_velocity`);
- sampling: t_k = 1 - k / 16, k = 0..15, x <- x + v(x, t_k) / 16; optionally their time
  shift s -> s / (s + f - f s) on the grid s = 1 - t; noise N(0, 1) * temperature, one draw
  shared by every stream; CFG v = v_u + s_img (v_tu - v_u) + s_text (v_c - v_tu) over the
  conditional (v_c), text-unconditional (v_tu: the image context kept, the instruction
  dropped) and unconditional (v_u) streams, text 3.0, image 1.1; with only two streams
  (text-to-image) v = v_u + s_text (v_c - v_u). Their `generate_image` passes its scales
  under names the inner call does not read, so they always run at 3.0 and 1.1.
[ours] param names (below); the training timestep distribution (their release has no
training code): logit-normal by default, mirrored from BitDance's so that the same share of
draws falls near the noise end (mean +0.8, std 0.8 in this t), or uniform; the condition
projection starts from the library's PyTorch-default init (theirs: their LLM's N(0, range)).

Params of `FlowHead` (their key under `vis_head.` / `diffloss.net.` in brackets):
  condition_proj {kernel, bias} [vis_head.0], condition_norm {scale, bias} [vis_head.1]
  net/input_proj [input_proj], net/time_embed/{time_in, time_out} [time_embed.mlp.{0, 2}],
  net/cond_embed [cond_embed], net/adaln_{i} [res_blocks.{i}.adaLN_modulation.1: their
  (shift, scale, gate) chunks are ours (scale, shift, gate)], net/res_blocks_{i}/norm
  [in_ln], net/res_blocks_{i}/mlp/{w1 (W, 2, hidden), w1_bias (2, hidden), w2}
  [mlp.w12, mlp.w3], net/final_adaln [final_layer.adaLN_modulation.1: (shift, scale) ->
  ours (scale, shift)], net/final_linear [final_layer.linear].
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.losses import diffusion
from unimm_jax.nn import initializers
from unimm_jax.nn.adaln import AdaLNMLP
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.embeddings import TIME_FREQUENCY_DIM
from unimm_jax.nn.mlp import swiglu_hidden_dim

NUM_STEPS = 16
TEXT_SCALE = 3.0
IMAGE_SCALE = 1.1


@dataclasses.dataclass(frozen=True)
class FlowHeadConfig:
  """Shape of the head (defaults: the paper's, with Ling-lite's 2048-wide LLM) and its
  training timesteps.

  input_width: the LLM's hidden width. width, depth: the adaLN MLP (their diffloss_w,
  diffloss_d); the condition is projected to `width` too (their z_channels = diffloss_w).
  mlp_ratio: their `flow_matching_swiglu-<ratio>`; SwiGLU hidden = `hidden_dim`.
  latent_dim: the tokenizer's latent channels.
  t_distribution: 'logit_normal' (t_mean, t_std) or 'uniform'; t = 1 is noise.
  dtype: compute dtype name; params, velocities and the loss stay float32.
  """
  input_width: int = 2048
  width: int = 3072
  depth: int = 12
  mlp_ratio: float = 4.0
  latent_dim: int = 32
  t_distribution: str = 'logit_normal'
  t_mean: float = -diffusion.P_MEAN
  t_std: float = diffusion.P_STD
  dtype: str = 'float32'

  def __post_init__(self):
    if self.t_distribution not in diffusion.T_DISTRIBUTIONS:
      raise ValueError(f'flow_head.t_distribution={self.t_distribution!r} is not one of '
                       f'{diffusion.T_DISTRIBUTIONS}')
    for name in ('input_width', 'width', 'depth', 'latent_dim'):
      if getattr(self, name) < 1:
        raise ValueError(f'flow_head.{name}={getattr(self, name)} must be at least 1')
    compute_dtype(self.dtype, 'flow_head.dtype')

  @property
  def hidden_dim(self) -> int:
    """Their SwiGLUFFNFused: (int(int(width * ratio) * 2 / 3) + 7) // 8 * 8 (8192 at 3072)."""
    return swiglu_hidden_dim(int(self.width * self.mlp_ratio), 1.0, multiple_of=8)


def _tokens(a: jax.Array, lead: tuple[int, ...]) -> jax.Array:
  """(*lead, c) -> (n, 1, c): every token its own batch row, for the (batch, length, ...)
  logical constraints of the layers."""
  return a.reshape((int(np.prod(lead, dtype=np.int64)), 1) + a.shape[len(lead):])


class FlowHead(nn.Module):
  """Velocity of a latent on the straight noise-to-data path, given the LLM's hidden state.

  `__call__(x_t, t, hidden)` = `velocity(x_t, t, condition(hidden))`; the sampler projects the
  condition once and calls `velocity` at every step. `loss` is the training objective.
  Shapes: x_t (..., latent_dim), t (...) in [0, 1] (1 = noise), hidden (..., input_width)
  -> velocity (..., latent_dim) float32.
  """
  config: FlowHeadConfig

  def setup(self):
    cfg = self.config
    dt = compute_dtype(cfg.dtype, 'flow_head.dtype')
    self.condition_proj = nn.Dense(cfg.width, dtype=dt,
                                   kernel_init=initializers.kernel_init(None, 'embed'),
                                   bias_init=initializers.zeros('embed'))
    self.condition_norm = nn.LayerNorm(epsilon=1e-6, dtype=dt,
                                       scale_init=initializers.ones('embed'),
                                       bias_init=initializers.zeros('embed'))
    self.net = AdaLNMLP(cfg.width, cfg.depth, cfg.latent_dim, hidden_dim=cfg.hidden_dim,
                        mlp_bias=True, frequency_dim=TIME_FREQUENCY_DIM, dtype=dt)

  def condition(self, hidden: jax.Array) -> jax.Array:
    """Their vis_head: LayerNorm(Linear(hidden)). (..., input_width) -> (..., width)."""
    if hidden.shape[-1] != self.config.input_width:
      raise ValueError(f'hidden states have width {hidden.shape[-1]}, the flow head expects '
                       f'input_width={self.config.input_width}')
    return self.condition_norm(self.condition_proj(hidden))

  def velocity(self, x_t: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
    """x_t (..., latent_dim), t (...) or scalar, condition (..., width) from `condition`
    -> (..., latent_dim) float32."""
    lead = x_t.shape[:-1]
    if x_t.shape[-1] != self.config.latent_dim:
      raise ValueError(f'latents have {x_t.shape[-1]} channels, the flow head expects '
                       f'latent_dim={self.config.latent_dim}')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), lead)
    out = self.net(_tokens(x_t, lead), _tokens(t, lead), _tokens(condition, lead))
    return out.astype(jnp.float32).reshape(x_t.shape)

  def __call__(self, x_t: jax.Array, t: jax.Array, hidden: jax.Array) -> jax.Array:
    return self.velocity(x_t, t, self.condition(hidden))

  def loss(self, x: jax.Array, hidden: jax.Array,
           weights: jax.Array | None = None) -> jax.Array:
    """Rectified-flow loss of clean latents x (..., latent_dim) (normalised) given hidden
    (..., input_width): t from config.t_distribution and eps ~ N(0, I) per token (the 'noise'
    rng stream: apply(..., rngs={'noise': key})), x_t = t eps + (1 - t) x, target x - eps;
    the mean squared velocity error (`diffusion.velocity_loss`, weights (...) per token or
    None), a float32 scalar."""
    cfg = self.config
    x = jnp.asarray(x, jnp.float32)
    t_key, eps_key = jax.random.split(self.make_rng('noise'))
    t = diffusion.sample_t(t_key, x.shape[:-1], cfg.t_distribution, cfg.t_mean, cfg.t_std)
    eps = jax.random.normal(eps_key, x.shape, jnp.float32)
    x_t = diffusion.rectified_flow_path(x, eps, t[..., None])
    pred = self(x_t, t, hidden)
    return diffusion.velocity_loss(pred, diffusion.rectified_flow_velocity(x, eps), weights)


# ----------------------------------------------------------------------------- sampling


def euler_timesteps(num_steps: int = NUM_STEPS,
                    time_shift: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(t, dt), each (num_steps,) float32: step k evaluates the velocity at t[k] and moves by
  dt[k] towards t = 0. Plain: t = 1 - k / n, dt = 1 / n. With their time shift f: the grid
  s = k / n becomes s / (s + f - f s), t = 1 - s, dt = t[k] - t[k + 1]."""
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps} must be at least 1')
  s = np.linspace(0.0, 1.0, num_steps + 1)
  if time_shift:
    s = s / (s + time_shift - time_shift * s)
  t = 1.0 - s
  dt = t[:-1] - t[1:] if time_shift else np.full(num_steps, 1.0 / num_steps)
  return t[:-1].astype(np.float32), dt.astype(np.float32)


def initial_noise(rng: jax.Array, num_tokens: int, latent_dim: int,
                  temperature: float = 1.0) -> jax.Array:
  """N(0, 1) * temperature, (num_tokens, latent_dim) float32: one draw per token, to be
  shared by all of its CFG streams."""
  return temperature * jax.random.normal(rng, (num_tokens, latent_dim), jnp.float32)


def guided_velocity(v_cond: jax.Array, v_text_uncond: jax.Array | None, v_uncond: jax.Array,
                    text_scale=TEXT_SCALE, image_scale=IMAGE_SCALE) -> jax.Array:
  """Their CFG, v_u + s_img (v_tu - v_u) + s_text (v_c - v_tu), or v_u + s_text (v_c - v_u)
  without a text-unconditional stream (v_text_uncond None), computed as v_c + (s_text - 1)
  (v_c - v_tu) + (s_img - 1)(v_tu - v_u), the same value, so that scales (1, 1) give v_c to
  the bit. Shapes: (n, d) each -> (n, d). Scales may be traced."""
  if v_text_uncond is None:
    return v_cond + (text_scale - 1.0) * (v_cond - v_uncond)
  return (v_cond + (text_scale - 1.0) * (v_cond - v_text_uncond)
          + (image_scale - 1.0) * (v_text_uncond - v_uncond))


def euler_integrate(velocity_fn, noise: jax.Array, num_steps: int = NUM_STEPS,
                    time_shift: float | None = None) -> jax.Array:
  """Euler from t = 1 to 0: x <- x + dt_k * velocity_fn(x, t_k) (`euler_timesteps`), starting
  at noise (n, d); velocity_fn(x (n, d), t scalar) -> (n, d). Returns x at t = 0, float32."""
  ts, dts = (jnp.asarray(a) for a in euler_timesteps(num_steps, time_shift))

  def step(k, x):
    return x + dts[k] * velocity_fn(x, ts[k])

  return jax.lax.fori_loop(0, num_steps, step, jnp.asarray(noise, jnp.float32))


def sample(head: FlowHead, params, hidden: jax.Array, noise: jax.Array, *,
           num_steps: int = NUM_STEPS, time_shift: float | None = None) -> jax.Array:
  """One stream, no guidance. hidden (n, input_width), noise (n, latent_dim) (already times
  the temperature) -> latents (n, latent_dim) float32 at t = 0. `params` is the head's
  'params' collection; jit-safe (num_steps and time_shift are static)."""
  variables = {'params': params}
  cond = head.apply(variables, hidden, method=FlowHead.condition)

  def velocity_fn(x, t):
    return head.apply(variables, x, t, cond, method=FlowHead.velocity)

  return euler_integrate(velocity_fn, noise, num_steps, time_shift)


def sample_cfg(head: FlowHead, params, cond: jax.Array, text_uncond: jax.Array | None,
               uncond: jax.Array, noise: jax.Array, *, text_scale=TEXT_SCALE,
               image_scale=IMAGE_SCALE, num_steps: int = NUM_STEPS,
               time_shift: float | None = None) -> jax.Array:
  """Guided sampling with their two-scale CFG (`guided_velocity`).

  cond, text_uncond, uncond: (n, input_width) LLM hidden states of the same n tokens in the
  conditional stream, the text-unconditional one (image context kept, instruction dropped;
  None for text-to-image, which has two streams) and the unconditional one. noise
  (n, latent_dim) (already times the temperature) is shared: the streams follow one
  trajectory, and run through the head as one batch. Returns latents (n, latent_dim) float32
  at t = 0. text_scale and image_scale may be traced; image_scale is unused without
  text_uncond. With scales (1, 1) the result equals `sample(head, params, cond, noise)`.
  """
  streams = [s for s in (cond, text_uncond, uncond) if s is not None]
  if len({s.shape for s in streams}) != 1:
    raise ValueError(f'the streams differ in shape: {[s.shape for s in streams]}')
  n, k = cond.shape[0], len(streams)
  variables = {'params': params}
  conds = head.apply(variables, jnp.concatenate(streams, axis=0), method=FlowHead.condition)

  def velocity_fn(x, t):
    v = head.apply(variables, jnp.tile(x, (k, 1)), t, conds, method=FlowHead.velocity)
    v = [v[i * n:(i + 1) * n] for i in range(k)]
    return guided_velocity(v[0], v[1] if k == 3 else None, v[-1], text_scale, image_scale)

  return euler_integrate(velocity_fn, noise, num_steps, time_shift)
