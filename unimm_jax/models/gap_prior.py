"""Generative-Aware Prior (UniWeTok eq 7): a tiny BitDance that models the tokenizer's latents.

L_GAP = E ||U_B - B([Query, U_B[:-1]], eps, t)||^2: the quantized latents U_Q (b, h, w, d) are
flattened row-major to U_B (b, h*w, d); a causal transformer reads [Query, U_B[:-1]] so that
its output at position j sees only U_B[:j], and a per-token diffusion head denoises U_B[j]
from z_t conditioned on that output. The loss is added to the tokenizer's with weight mu
(eq 8); its gradient reaches the tokenizer through both the transformer's inputs and the
diffusion targets (eq 7 has no stop-gradient), which is what shapes the latent space. The
prior is used only in training: inference runs the tokenizer alone (paper appendix B).

Where each choice comes from:
- [paper sec 3.1, Table 5, Tables 25-27] the query switch. "Query token allows the model not
  to miss the prediction of the first token", so without it the sequence is U_B[:-1] alone and
  the targets are U_B[1:]: the first token is never predicted (the row that hurt gFID).
- [paper appendix B] "BitDance-T", ~8.6M parameters; its configuration is not published (the
  BitDance code defines B, L and H only). `GAPPriorConfig.paper()` keeps BitDance's shape
  (head_dim 64 as in B/L/H; head width = transformer width; one adaLN shared by the head's
  blocks) and picks width 256, 8 blocks, a 3-block head: 8.50M parameters at d = 128.
- [code: BitDance imagenet_gen/src/model.py `BitDance`] a SwiGLU connector with biases
  (hidden 1.5 * width) embeds each latent; the query is a learned vector (their class
  embedding with one class), N(0, 0.02); an RMSNorm follows the embedding and the last
  block; blocks are pre-RMSNorm causal attention + SwiGLU; 2D RoPE with the query at
  position 0 and input token U_B[j] at the grid position of cell j.
- [code: diff_head.py `MlpEncoder`, flow_head_parallel_x.py] the head is BitDance's serial
  binary diffusion head, `unimm_jax.models.bit_diffusion.BitDiffusionHead` (the one the
  BitDance generators use), with bias-free SwiGLUs and x-prediction through 2 * sigmoid - 1;
  its loss is `bit_diffusion.denoising_loss` with one t per token. `noise_repeats` is their
  `diff_batch_mul` (4): every target is denoised at that many (t, eps) draws.
- [open] grid positions use the decoder's 8x8 normalisation of `unimm_jax.nn.rope`, which
  equals BitDance's (i + 0.5) at the paper's 8x8 grid and stays in range at other
  resolutions; for the same reason BitDance's learned per-position embedding added to the
  head's condition (`pos_for_diff`, fixed length) is replaced by a fixed 2D sin-cos
  embedding of the target cell's position. Transformer kernels use the library's
  PyTorch-default init rather than BitDance's N(0, 0.02).
"""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.losses import diffusion
from unimm_jax.models.bit_diffusion import BitDiffusionHead, denoising_loss
from unimm_jax.nn import initializers
from unimm_jax.nn import masks
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.embeddings import sincos_2d_embedding
from unimm_jax.nn.mlp import SwiGLU
from unimm_jax.nn.norms import RMSNorm
from unimm_jax.nn.rope import GridPositions, grid_positions, rope_2d_angles
from unimm_jax.nn.transformer import TransformerBlock

__all__ = ['GAPPrior', 'GAPPriorConfig']


@dataclasses.dataclass(frozen=True)
class GAPPriorConfig:
  """Shape of the prior; the defaults are the paper's (`paper()`).

  latent_dim: d, bits per token (g * d' = 128 in the paper).
  width, depth, num_heads: the causal transformer (head_dim = width / num_heads, a multiple
    of 4 for 2D RoPE).
  head_width, head_depth, head_adaln_blocks: the diffusion head; consecutive head blocks
    share one adaLN projection, head_depth / head_adaln_blocks blocks each.
  use_query_token: the Table 5 switch (see the module docstring).
  noise_repeats: (t, eps) draws per target token.
  t_mean, t_std: logit-normal timestep distribution.
  dtype: compute dtype name; params and the loss stay float32.
  """
  latent_dim: int = 128
  width: int = 256
  depth: int = 8
  num_heads: int = 4
  head_width: int = 256
  head_depth: int = 3
  head_adaln_blocks: int = 1
  use_query_token: bool = True
  noise_repeats: int = 4
  t_mean: float = diffusion.P_MEAN
  t_std: float = diffusion.P_STD
  dtype: str = 'float32'

  def __post_init__(self):
    if self.width % self.num_heads or (self.width // self.num_heads) % 4:
      raise ValueError(f'width={self.width} / num_heads={self.num_heads} must be a head_dim '
                       'divisible by 4 (2D RoPE)')
    if self.head_adaln_blocks < 1 or self.head_depth % self.head_adaln_blocks:
      raise ValueError(f'head_adaln_blocks={self.head_adaln_blocks} must divide '
                       f'head_depth={self.head_depth}')
    if self.noise_repeats < 1:
      raise ValueError(f'noise_repeats={self.noise_repeats} must be at least 1')
    compute_dtype(self.dtype, 'gap_prior.dtype')

  @classmethod
  def paper(cls, **overrides) -> 'GAPPriorConfig':
    """BitDance-T over 16 x 8 = 128 bits: 8.50M parameters (the paper: 8.6M); see the module
    docstring."""
    return cls(**overrides)


class GAPPrior(nn.Module):
  """The Generative-Aware Prior: causal transformer + per-token diffusion head.

  `__call__(latents)` -> (loss, metrics); `features(latents)` -> (conditions, targets).
  latents: U_Q (b, h, w, d) in {-1, +1} (the straight-through quantized latents). With
  use_query_token m = h * w targets (all of U_B), without it m = h * w - 1 (U_B[1:]).
  The loss draws t and eps from the 'noise' rng stream: apply(..., rngs={'noise': key}).
  """
  config: GAPPriorConfig

  def setup(self):
    cfg = self.config
    dt = compute_dtype(cfg.dtype, 'gap_prior.dtype')
    # BitDance's `MLPConnector`: a SwiGLU with biases, hidden 1.5 * width, latent_dim -> width.
    self.connector = SwiGLU(int(1.5 * cfg.width), out_features=cfg.width, use_bias=True,
                            names=('connector_in', 'connector_out'), dtype=dt)
    if cfg.use_query_token:
      self.query = self.param('query', initializers.normal(0.02, 'embed'), (cfg.width,))
    self.embed_norm = RMSNorm(dtype=dt)
    self.blocks = [TransformerBlock(cfg.num_heads, dt) for _ in range(cfg.depth)]
    self.final_norm = RMSNorm(dtype=dt)
    self.head = BitDiffusionHead(cfg.head_width, cfg.head_depth, cfg.head_adaln_blocks,
                                 mlp_bias=False, dtype=dt)

  def features(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Head conditions aligned with their targets.

    Returns: conditions (b, m, width), where row j depends on U_B[:target j] only, and
    targets (b, m, d) float32.
    """
    cfg = self.config
    chex.assert_rank(latents, 4)
    b, h, w, d = latents.shape
    if d != cfg.latent_dim:
      raise ValueError(f'latents have {d} channels, the prior expects latent_dim={cfg.latent_dim}')
    if h * w < 2:
      raise ValueError(f'a {h}x{w} grid has no next token to predict')
    tokens = latents.reshape(b, h * w, d).astype(jnp.float32)
    x = self.connector(tokens[:, :-1])
    num_prefix = 1 if cfg.use_query_token else 0
    if cfg.use_query_token:
      query = jnp.broadcast_to(self.query.astype(x.dtype), (b, 1, cfg.width))
      x = jnp.concatenate([query, x], axis=1)
    x = nn.with_logical_constraint(self.embed_norm(x), ('batch', 'length', 'embed'))
    # Static shapes only: numpy at trace time, constants in XLA. Input token U_B[j] sits at
    # cell j; the query, when present, at position 0 (as BitDance's class tokens).
    cells = grid_positions(h, w, GridPositions.DECODER)
    angles = rope_2d_angles(cells, cfg.width // cfg.num_heads, num_prefix=num_prefix)[:-1]
    causal = masks.causal(b, x.shape[1])
    for block in self.blocks:
      x = block(x, jnp.asarray(angles), causal)
    target_cells = cells[1 - num_prefix:]
    x = self.final_norm(x) + jnp.asarray(sincos_2d_embedding(target_cells, cfg.width), x.dtype)
    return x, tokens[:, 1 - num_prefix:]

  def __call__(self, latents: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """latents (b, h, w, d) -> (float32 scalar loss, metrics of float32 scalars).

    metrics: `x_mse`, the mean squared error of the x estimate, and `bit_accuracy`, how often
    its sign matches the target bit (both at the sampled timesteps, for logging only).
    """
    cfg = self.config
    cond, target = self.features(latents)
    return denoising_loss(self.head, target, cond, self.make_rng('noise'),
                          repeats=cfg.noise_repeats, t_mean=cfg.t_mean, t_std=cfg.t_std)
