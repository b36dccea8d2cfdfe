"""Adaptive LayerNorm (adaLN): a condition sets the scale, shift and gate of a residual block.

`modulation` is the zero-initialised projection of the condition, so every block starts as
the identity (gate 0) and the final layer at a zero shift and scale (DiT, BitDance's heads);
`AdaLNResBlock` is x + gate * SwiGLU(LayerNorm(x) * (1 + scale) + shift) (or, with
`swiglu=False`, a plain Linear-SiLU-Linear MLP in place of the SwiGLU).

`adaln_mlp` / `AdaLNMLP` is the whole per-token denoiser of the SimpleMLPAdaLN family (MAR's
diffusion loss, adapted by BitDance's `MlpEncoder` and Ming-UniVision's rectified-flow head):
input projection, timestep MLP and condition projection summed into y, residual adaLN blocks
driven by silu(y), then a final affine-free LayerNorm, modulated, and a linear output. With
`attention_heads` its blocks are `AdaLNTransformerBlock`s instead (BitDance's `TransEncoder`,
the parallel head): the m tokens of a row attend to each other, so a row denoises P tokens
jointly. `unimm_jax.models.bit_diffusion.BitDiffusionHead` and the Ming-UniVision flow head
are built on it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.embeddings import TIME_FREQUENCY_DIM, TimestepEmbedder
from unimm_jax.nn.mlp import MLP, SwiGLU

Dtype = Any


def modulation(y: jax.Array, chunks: int, name: str, dtype: Dtype) -> list[jax.Array]:
  """Zero-initialised Dense(chunks * width) of the condition y (..., width), split into
  `chunks` arrays of y's width (e.g. scale, shift, gate). Created on the calling module."""
  width = y.shape[-1]
  out = nn.Dense(chunks * width, dtype=dtype, name=name,
                 kernel_init=initializers.zeros('embed', 'mlp'),
                 bias_init=initializers.zeros('mlp'))(y)
  return jnp.split(out, chunks, axis=-1)


def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
  """x + gate * SwiGLU(LayerNorm(x) * (1 + scale) + shift) (BitDance diff_head.py `ResBlock`,
  Ming-UniVision diff_loss_rf_swiglu.py `ResBlock`). LayerNorm eps 1e-6 with scale and bias.

  hidden_dim: the SwiGLU's hidden width; None is 1.5 * width (BitDance's). mlp_bias: biases on
  its projections (Ming-UniVision's have them; the default is the library's bias-free one).
  swiglu: False replaces the SwiGLU by fc2(silu(fc1(.))) with biases (BitDance's MLLM head,
  flow_head_parallel_x.py `TransBlock` with use_swiglu False); mlp_bias is then unused.
  Params: norm {scale, bias}, mlp (`SwiGLU` fused layout: w1 (width, 2, hidden) gate then up,
  [w1_bias (2, hidden)], w2 {kernel, [bias]}; without swiglu, `MLP`: fc1 {kernel (width,
  hidden), bias}, fc2 {kernel (hidden, width), bias}).

  Shapes: x, scale, shift, gate (b, m, width) -> (b, m, width).
  """
  dtype: Dtype = jnp.float32
  hidden_dim: int | None = None
  mlp_bias: bool = False
  swiglu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, scale: jax.Array, shift: jax.Array,
               gate: jax.Array) -> jax.Array:
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, scale_init=initializers.ones('embed'),
                     bias_init=initializers.zeros('embed'), name='norm')(x)
    hidden = self.hidden_dim or int(1.5 * x.shape[-1])
    mlp = (SwiGLU(hidden, use_bias=self.mlp_bias, dtype=self.dtype, name='mlp') if self.swiglu
           else MLP(hidden, 'silu', dtype=self.dtype, name='mlp'))
    return x + gate * mlp(modulate(h, scale, shift))


class AdaLNTransformerBlock(nn.Module):
  """BitDance's `TransBlock` (diff_head_parallel.py): adaLN attention, then an adaLN SwiGLU.

    x = x + gate1 * attention(LayerNorm(x) * (1 + scale1) + shift1)
    x = AdaLNResBlock(x, scale2, shift2, gate2)

  The attention is bidirectional over the m tokens of each row, without positions (a parallel
  head's tokens know their place from their conditions) or q/k norms, with biases on q, k, v
  and out. Params: attention_norm {scale, bias}, attention {query, key, value, out (+ _bias)},
  ffn (an `AdaLNResBlock`; `swiglu` as there).

  Shapes: x (b, m, width); modulations: six (b, m, width) (scale1, shift1, gate1, scale2,
  shift2, gate2) -> (b, m, width).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  hidden_dim: int | None = None
  mlp_bias: bool = True
  swiglu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, modulations: list[jax.Array]) -> jax.Array:
    scale1, shift1, gate1, scale2, shift2, gate2 = modulations
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, scale_init=initializers.ones('embed'),
                     bias_init=initializers.zeros('embed'), name='attention_norm')(x)
    h = MultiHeadAttention(self.num_heads, qkv_bias=True, out_bias=True, rope=None,
                           dtype=self.dtype, name='attention')(modulate(h, scale1, shift1))
    x = x + gate1 * h
    return AdaLNResBlock(self.dtype, self.hidden_dim, self.mlp_bias, self.swiglu, name='ffn')(
        x, scale2, shift2, gate2)


def _xavier_dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
  """Dense with a Xavier-uniform kernel and zero bias, as these heads initialise them; the
  input axis stays unnamed (one mesh axis cannot shard both sides of a kernel)."""
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                           (None, 'embed')),
                  bias_init=initializers.zeros('embed'))


def adaln_mlp(x: jax.Array, t: jax.Array, cond: jax.Array, *, width: int, depth: int,
              out_features: int, dtype: Dtype, adaln_blocks: int | None = None,
              hidden_dim: int | None = None, mlp_bias: bool = False,
              frequency_dim: int = TIME_FREQUENCY_DIM, attention_heads: int = 0,
              swiglu: bool = True) -> jax.Array:
  """The SimpleMLPAdaLN denoiser (module docstring), created on the calling module: call it
  from a compact method.

  x (b, m, d_in) noisy latents, t (b, m) timesteps in [0, 1] (embedded as 1000 t), cond
  (b, m, c) -> raw output (b, m, out_features) in `dtype`.

  y = TimestepEmbedder(t) + cond_embed(cond); h = input_proj(x); `depth` AdaLNResBlocks, the
  blocks of each run of depth / adaln_blocks sharing one zero-initialised `adaln_{k}` (scale,
  shift, gate) of silu(y) (adaln_blocks None: one per block); then final_adaln (scale, shift)
  of silu(y) modulates an affine-free LayerNorm (eps 1e-6) and the zero-initialised
  final_linear maps to out_features. input_proj and cond_embed are Xavier-uniform.

  attention_heads: 0 for per-token blocks (`AdaLNResBlock`, 3 modulations each); > 0 for
  `AdaLNTransformerBlock`s with that many heads (6 modulations), where the m tokens of a row
  attend to each other. swiglu: False gives every block a Linear-SiLU-Linear MLP instead of
  its SwiGLU (`AdaLNResBlock`).

  Params: input_proj, time_embed {time_in, time_out}, cond_embed, adaln_{k}, res_blocks_{i},
  final_adaln, final_linear (each {kernel, bias}).
  """
  adaln_blocks = depth if adaln_blocks is None else adaln_blocks
  if adaln_blocks < 1 or depth % adaln_blocks:
    raise ValueError(f'adaln_blocks={adaln_blocks} must divide depth={depth}')
  h = _xavier_dense(width, 'input_proj', dtype)(x.astype(dtype))
  t_emb = TimestepEmbedder(width, frequency_dim, dtype=dtype, name='time_embed')(t)
  y = nn.silu(t_emb + _xavier_dense(width, 'cond_embed', dtype)(cond.astype(dtype)))
  per_adaln = depth // adaln_blocks
  for i in range(depth):
    if i % per_adaln == 0:  # zero-initialised: every block starts as the identity
      mods = modulation(y, 6 if attention_heads else 3, f'adaln_{i // per_adaln}', dtype)
    if attention_heads:
      h = AdaLNTransformerBlock(attention_heads, dtype, hidden_dim, mlp_bias, swiglu,
                                name=f'res_blocks_{i}')(h, mods)
    else:
      h = AdaLNResBlock(dtype, hidden_dim, mlp_bias, swiglu, name=f'res_blocks_{i}')(h, *mods)
  scale, shift = modulation(y, 2, 'final_adaln', dtype)
  h = modulate(nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype,
                            name='final_norm')(h), scale, shift)
  return nn.Dense(out_features, dtype=dtype, kernel_init=initializers.zeros('embed', None),
                  bias_init=initializers.zeros(None), name='final_linear')(h)


class AdaLNMLP(nn.Module):
  """`adaln_mlp` as a module (its params directly under this module's name); the attributes
  are its keyword arguments. Shapes: x (b, m, d_in), t (b, m), cond (b, m, c) ->
  (b, m, out_features)."""
  width: int
  depth: int
  out_features: int
  adaln_blocks: int | None = None
  hidden_dim: int | None = None
  mlp_bias: bool = False
  frequency_dim: int = TIME_FREQUENCY_DIM
  attention_heads: int = 0
  swiglu: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
    return adaln_mlp(x, t, cond, width=self.width, depth=self.depth,
                     out_features=self.out_features, dtype=self.dtype,
                     adaln_blocks=self.adaln_blocks, hidden_dim=self.hidden_dim,
                     mlp_bias=self.mlp_bias, frequency_dim=self.frequency_dim,
                     attention_heads=self.attention_heads, swiglu=self.swiglu)
