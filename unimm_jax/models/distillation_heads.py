"""Semantic heads of UniWeTok's Pre-Post Distillation: tokenizer tokens -> one teacher vector.

The paper (eqs 4-6) pools the pre-quantization latents U_G with AttnPool_pre and the
straight-through quantized latents U_Q with AttnPool_post, two separate heads, each giving a
vector compared by cosine with the teacher's pooled embedding f_T (b, d_T). The setting
tables name the head ("distill head") without defining it: `linear` in Tables 14-26 and 28
(ImageNet ablations, DataComp at batch 128), `attention` in Tables 29-33 (DataComp; Table 6:
attention 4.09 vs linear 3.89 top-1). The authors' code is not public, so both designs here
are ours:

  linear     y = W mean_n(x) + b. Because the map is linear, this equals projecting every
             token and then averaging, so both readings of "linear head" are the same function
             with the same (c, out_dim) parameters.
  attention  The teacher's own pooling, SigLIP's MAP head (`unimm_jax.nn.attention_pool`),
             placed on the tokenizer's tokens: t = LN(Dense(x)) to the head width;
             y = MHA(probe, t, t) with one learned probe; y = y + MLP(LN(y)); out = Dense(y)
             to out_dim. SigLIP2's pooled f_T is the
             output of exactly such a head over its LayerNormed last tokens, so the student
             is given the form of the function that made its target. The LayerNorm on the
             projected tokens stands in for SigLIP's final LayerNorm and fixes the key scale,
             which otherwise differs between U_G (SigLu output in (-1, 1)) and U_Q (exactly
             +-1). There are no position embeddings (SigLIP's head has none either): the
             encoder has already mixed every token with its context, and the pooled vector is
             then invariant to the order of the tokens, as the linear head's mean is.

Neither head normalises its output: the cosine loss ignores the scale.
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.attention_pool import AttentionPool

Dtype = Any
HEAD_KINDS = ('linear', 'attention')


def _flatten_tokens(tokens: jax.Array, key_mask: jax.Array | None
                    ) -> tuple[jax.Array, jax.Array | None]:
  """(b, h, w, c) or (b, n, c) tokens and a (b, h, w) / (b, n) mask -> (b, n, c), (b, n)."""
  if tokens.ndim not in (3, 4):
    raise ValueError(f'SemanticHead: tokens must be (b, h, w, c) or (b, n, c), got shape '
                     f'{tokens.shape}')
  if key_mask is not None and key_mask.shape != tokens.shape[:-1]:
    raise ValueError(f'SemanticHead: key_mask shape {key_mask.shape} does not match the token '
                     f'grid {tokens.shape[:-1]}')
  b, c = tokens.shape[0], tokens.shape[-1]
  tokens = tokens.reshape(b, -1, c)
  return tokens, None if key_mask is None else key_mask.reshape(b, -1).astype(bool)


class SemanticHead(nn.Module):
  """One distillation head (AttnPool_pre or AttnPool_post): tokens -> (b, out_dim) float32.

  Shapes: tokens (b, h, w, c) or (b, n, c); key_mask of the same leading shape, bool, False
  for tokens to ignore, or None -> (b, out_dim). A row whose tokens are all masked pools
  nothing meaningful: the linear head returns its bias, the attention head (whose masked
  logits all get the same large negative value) averages every token uniformly.

  Attributes:
    kind: 'linear' or 'attention' (the "distill head" row of the paper's setting tables).
    out_dim: d_T, the width of the teacher's pooled embedding (1152 for SigLIP2 So400m).
    num_heads: attention heads of the probe attention; must divide `width`.
    width: head width the tokens are projected to; None -> out_dim, the teacher's width,
      which the default 16 heads divide as in So400m's own head (1152 = 16 x 72).
    mlp_ratio: hidden width of the MLP after the attention, as a multiple of `width`
      (SigLIP's MAP head: 4304 / 1152 ~ 3.7); 0 drops the MLP and its LayerNorm.
    dtype: compute dtype; parameters stay float32 and the output is float32.
  """
  kind: str
  out_dim: int
  num_heads: int = 16
  width: int | None = None
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    if self.kind not in HEAD_KINDS:
      raise ValueError(f'SemanticHead.kind={self.kind!r} is not one of {HEAD_KINDS}')
    x, mask = _flatten_tokens(tokens, key_mask)
    x = nn.with_logical_constraint(x.astype(self.dtype), ('batch', 'length', None))
    if self.kind == 'linear':
      pooled = self._masked_mean(x, mask)
      y = nn.Dense(self.out_dim, dtype=self.dtype,
                   kernel_init=initializers.kernel_init('conv_in', 'embed'),
                   bias_init=initializers.zeros('embed'), name='proj')(pooled)
      return y.astype(jnp.float32)

    width = self.width or self.out_dim
    if width % self.num_heads:
      raise ValueError(f'SemanticHead: width {width} is not divisible by num_heads='
                       f'{self.num_heads}')
    # The tokenizer's channels (128 at the paper's size) are few; their axis is replicated.
    t = nn.Dense(width, dtype=self.dtype, kernel_init=initializers.kernel_init('conv_in', 'embed'),
                 bias_init=initializers.zeros('embed'), name='in_proj')(x)
    # Two-pass variance, as torch's LayerNorm computes it.
    t = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                     scale_init=initializers.ones('embed'), bias_init=initializers.zeros('embed'),
                     name='token_norm')(t)
    t = nn.with_logical_constraint(t, ('batch', 'length', 'embed'))
    # The pool's params (probe, attention, mlp_norm, fc1, fc2) sit beside in_proj and out_proj.
    pool = AttentionPool(self.num_heads, int(self.mlp_ratio * width), 'gelu_pytorch_tanh',
                         norm_name='mlp_norm', nested_mlp=False, dtype=self.dtype)
    nn.share_scope(self, pool)
    y = pool(t, mask)
    # The output axis is the teacher's width; 'embed' already names the input axis.
    out = nn.Dense(self.out_dim, dtype=self.dtype,
                   kernel_init=initializers.kernel_init('embed', None),
                   bias_init=initializers.zeros(None), name='out_proj')(y)
    return out.astype(jnp.float32)

  @staticmethod
  def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """(b, n, c), (b, n) or None -> (b, c) mean over the kept tokens, accumulated in float32."""
    x32 = x.astype(jnp.float32)
    if mask is None:
      return jnp.mean(x32, axis=1).astype(x.dtype)
    weights = mask.astype(jnp.float32)[..., None]
    # A fully masked row divides by 1 and gives zeros, so its output is the bias, not NaN.
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return (jnp.sum(x32 * weights, axis=1) / count).astype(x.dtype)


class PrePostHeads(nn.Module):
  """AttnPool_pre and AttnPool_post of eqs 4-5 as one module, either one switchable off.

  `__call__(pre_tokens, post_tokens)` with U_G and U_Q, each (b, h, w, c), returns
  (u_G, u_Q), each (b, out_dim) float32 or None where that distillation is off (the
  "pre distillation" / "post distillation" rows of the setting tables). The two heads share
  nothing; their parameters live under `pre_head` and `post_head`.

  `zero_shot_embedding(post_tokens)` embeds the discrete tokens U_Q for zero-shot
  classification: with the post head, or with the pre head where post distillation is off.
  The paper measures the discrete latents: its two pre-only runs (Tables 17 and 20) differ
  only in SigLu and score 55.26 vs 0.10 top-1 (Tables 2, 3), "pre distillation ... fails to
  ensure semantics in the discrete latents". Without SigLu the commitment loss holds U_G
  near +-1, so the pre head transfers to U_Q; with SigLu it does not. Pooling U_G instead
  would have scored both runs alike.
  """
  kind: str
  out_dim: int
  num_heads: int = 16
  width: int | None = None
  mlp_ratio: float = 4.0
  pre: bool = True
  post: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    if not (self.pre or self.post):
      raise ValueError('PrePostHeads: pre and post distillation are both off; build no heads')

    def make() -> SemanticHead:
      return SemanticHead(self.kind, self.out_dim, self.num_heads, self.width, self.mlp_ratio,
                          self.dtype)

    self.pre_head = make() if self.pre else None
    self.post_head = make() if self.post else None

  def __call__(self, pre_tokens: jax.Array, post_tokens: jax.Array
               ) -> tuple[jax.Array | None, jax.Array | None]:
    chex.assert_equal_shape([pre_tokens, post_tokens])
    u_g = self.pre_head(pre_tokens) if self.pre else None
    u_q = self.post_head(post_tokens) if self.post else None
    return u_g, u_q

  def zero_shot_embedding(self, post_tokens: jax.Array) -> jax.Array:
    """U_Q (b, h, w, c) -> (b, out_dim) float32 through the post head (else the pre head)."""
    return (self.post_head if self.post else self.pre_head)(post_tokens)
