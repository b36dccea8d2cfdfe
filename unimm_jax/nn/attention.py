"""The one attention module: self or cross, grouped-query, RoPE, q/k norms, masks, KV cache.

Every transformer of the library (the LLM, the ViTs, UniWeTok's grid transformer, the GAP
prior, the pooling heads) runs this module; they differ only in its switches:

  num_kv_heads     grouped-query attention (each kv head serves num_heads / num_kv_heads
                   query heads); None: as many as query heads
  head_dim         per-head width; None: query width / num_heads. num_heads * head_dim may
                   differ from the model width (Qwen3); the output projection maps back
  qkv_bias,        biases on the q/k/v projections and on the output projection
    out_bias
  qk_norm          None, 'rms' (Qwen3: RMSNorm over head_dim, one shared scale) or
                   'layernorm' (Chameleon: LayerNorm over head_dim with a (heads, head_dim)
                   affine, `unimm_jax.nn.norms.HeadwiseLayerNorm`), applied before RoPE
  rope             None, 'rotate_half' (1D, LLMs) or 'pairs' (2D over a grid, UniWeTok);
                   the caller passes the angles (`unimm_jax.nn.rope`)
  param_layout     'flat': params `query`, `key`, `value`, `out` (+ `<name>_bias`) on this
                   module (the ViT and tokenizer layout); 'hf': submodules `q_proj`, `k_proj`,
                   `v_proj`, `o_proj` with `kernel` and `bias` (transformers' LLM names)
  kernel_stddev    N(0, stddev) kernels (LLMs); None: PyTorch's default initialisation
  implementation   `jax.nn.dot_product_attention`'s: 'xla' (default, every backend),
                   'cudnn' (fused kernel on NVIDIA GPUs), or None (JAX chooses)

Kernels: query/key/value (embed, heads, head_dim), out (heads, head_dim, embed). A PyTorch
Linear `q_proj.weight` of shape (heads * head_dim, dim) maps onto the query kernel as
`w.T.reshape(dim, heads, head_dim)`; a fused `wqkv` / `in_proj_weight` (3 * dim, dim) is
chunked into three equal row blocks first (q, k, v in that order); `out_proj.weight`
(dim, heads * head_dim) maps onto `out` as `w.T.reshape(heads, head_dim, dim)`.

Masks: `mask` is a `unimm_jax.nn.masks.MaskSpec` (self-attention: the same orders for queries
and keys) or a dense (b, 1, q, k) bool array built with `masks.dense_mask` (a stack computes
it once for all its layers); `key_mask` (b, k) marks padding keys; `segment_ids` (b, t) keep
self-attention inside runs of equal ids (packed sequences). With a `LayerCache`, the
new keys and values are written into the cache in place and attention runs over every slot.
The softmax scale is 1 / sqrt(head_dim); logits and softmax are float32 (XLA's reference
implementation accumulates them in float32 whatever the input dtype).
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import kv_cache
from unimm_jax.nn import masks
from unimm_jax.nn.linear import Projection, project
from unimm_jax.nn.norms import HeadwiseLayerNorm, RMSNorm
from unimm_jax.nn.rope import apply_rope, apply_rope_rotate_half

Dtype = Any
QK_NORMS = (None, 'rms', 'layernorm')
ROPE_STYLES = (None, 'rotate_half', 'pairs')
PARAM_LAYOUTS = ('flat', 'hf')
IMPLEMENTATIONS = ('xla', 'cudnn', None)
_HF_NAMES = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj', 'out': 'o_proj'}


class MultiHeadAttention(nn.Module):
  """Softmax attention with the switches of the module docstring.

  Shapes: x (b, t, d) queries; kv (b, s, d_kv) keys/values, default x (self-attention);
  angles (t, head_dim // 2) or (b, t, head_dim // 2) rotary angles for q and k
  (self-attention only) or None; key_mask (b, s) bool, False for padding keys; mask a
  MaskSpec or (b, 1, t, s) bool; segment_ids (b, t) int (self-attention); cache a
  `kv_cache.LayerCache` (self-attention), whose slots then make s. Returns
  (b, t, out_features or d); with a cache, (that, updated cache).
  """
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: str | None = None
  qk_norm_eps: float = 1e-6
  rope: str | None = 'pairs'
  param_layout: str = 'flat'
  kernel_stddev: float | None = None
  implementation: str | None = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check(self, dim: int) -> int:
    for value, allowed, name in ((self.qk_norm, QK_NORMS, 'qk_norm'),
                                 (self.rope, ROPE_STYLES, 'rope'),
                                 (self.param_layout, PARAM_LAYOUTS, 'param_layout'),
                                 (self.implementation, IMPLEMENTATIONS, 'implementation')):
      if value not in allowed:
        raise ValueError(f'MultiHeadAttention.{name}={value!r} is not one of {allowed}')
    if self.head_dim is None and dim % self.num_heads:
      raise ValueError(f'width {dim} is not divisible by num_heads={self.num_heads}')
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={kv_heads}')
    return self.head_dim or dim // self.num_heads

  def _project(self, name: str, x: jax.Array, out_shape: tuple[int, ...],
               axes: tuple[str, ...], use_bias: bool) -> jax.Array:
    """One of the four projections, with its params in `param_layout`."""
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, stddev=self.kernel_stddev)
    if self.param_layout == 'hf':
      return Projection(out_shape, axes, use_bias, name=_HF_NAMES[name], **common)(x)
    return project(self, x, out_shape, axes, kernel_name=name,
                   bias_name=f'{name}_bias' if use_bias else None, **common)

  def _qk_norm(self, name: str) -> nn.Module:
    if self.qk_norm == 'rms':
      return RMSNorm(self.qk_norm_eps, dtype=self.dtype, scale_axis='kv', name=name)
    return HeadwiseLayerNorm(self.qk_norm_eps, dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | None = None,
               angles: jax.Array | None = None, key_mask: jax.Array | None = None, *,
               mask: masks.MaskSpec | jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               cache: kv_cache.LayerCache | None = None):
    self_attention = kv is None
    kv = x if kv is None else kv
    chex.assert_rank([x, kv], 3)
    head_dim = self._check(x.shape[-1])
    kv_heads = self.num_kv_heads or self.num_heads
    if not self_attention and (angles is not None or cache is not None
                               or segment_ids is not None):
      raise ValueError('rotary angles, segment ids and a KV cache are for self-attention only')
    q = self._project('query', x, (self.num_heads, head_dim), ('embed', 'heads', 'kv'),
                      self.qkv_bias)
    # kv heads shard over 'heads' too; spec_for replicates them when tensor does not divide.
    k, v = (self._project(name, kv, (kv_heads, head_dim), ('embed', 'heads', 'kv'),
                          self.qkv_bias) for name in ('key', 'value'))
    if self.qk_norm is not None:
      q, k = self._qk_norm('q_norm')(q), self._qk_norm('k_norm')(k)
    if angles is not None:
      if self.rope is None:
        raise ValueError('rotary angles given to attention built with rope=None')
      rotate = apply_rope_rotate_half if self.rope == 'rotate_half' else apply_rope
      q, k = rotate(q, angles), rotate(k, angles)
    q, k, v = (nn.with_logical_constraint(t, ('batch', 'length', 'heads', 'kv'))
               for t in (q, k, v))
    if cache is not None:
      cache, k, v = kv_cache.write_layer(cache, k, v)
    dense = _dense(mask, key_mask, segment_ids)
    out = jax.nn.dot_product_attention(q, k, v, mask=dense, implementation=self.implementation)
    y = self._project('out', out, (self.out_features or x.shape[-1],),
                      ('heads', 'kv', 'embed'), self.out_bias)
    return y if cache is None else (y, cache)


def _dense(mask: masks.MaskSpec | jax.Array | None, key_mask: jax.Array | None,
           segment_ids: jax.Array | None) -> jax.Array | None:
  """(b, 1, t, s) bool from a MaskSpec or dense mask, a (b, s) key mask and (b, t) segment
  ids, or None when nothing is masked."""
  if isinstance(mask, masks.MaskSpec):
    mask = masks.dense_mask(mask.order, mask.order, segment_ids, segment_ids)
  elif segment_ids is not None:
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    mask = same if mask is None else mask & same
  if key_mask is not None:
    keys = key_mask[:, None, None, :].astype(bool)
    mask = keys if mask is None else mask & keys
  return mask
