"""Decoder-only language model shared by every unified model (Qwen2, Qwen3, Llama, Chameleon).

Layer (pre-norm, the default):  h = x + attn(norm1(x));  out = h + mlp(norm2(h))
Layer (Chameleon `swin_norm`):   h = x + norm1(attn(x));  out = h + norm2(mlp(h))
attn: grouped-query attention (num_kv_heads divides num_heads), softmax scale
  1/sqrt(head_dim), optional q/k/v biases (Qwen2), optional q/k norm applied per head before
  RoPE (Qwen3: RMSNorm over head_dim, one scale shared by all heads; Chameleon: LayerNorm
  over head_dim, eps 1e-5, no statistics across heads, then a per-head scale and bias of
  shape (heads, head_dim)), RoPE in the rotate-half convention (channel i pairs with
  i + head_dim/2), then the output projection.
mlp: SwiGLU, down(silu(gate(x)) * up(x)).
Then a final RMSNorm and the LM head (its own kernel, or the token embedding when tied).

Sequences: `attention_mask` (b, s) marks real tokens (left-padded batches), `segment_ids`
(b, s) restricts attention to tokens of the same segment (packed documents); attention is
always causal in sequence order. Positions default to the count of real tokens before each
token (restarting per segment), as transformers numbers a left-padded batch.

KV cache: an explicit `KVCache` pytree passed in and returned (see `init_cache`), so a
decode loop is a plain `jax.lax.while_loop` and works the same with scanned layers.
"""
import dataclasses
import math
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.nn import initializers
from unimm_jax.nn.norms import RMSNorm

Dtype = Any
RopeCosSin = tuple[jax.Array, jax.Array]

ROPE_TYPES = ('linear', 'llama3')
QK_NORMS = (None, 'rms', 'chameleon')
# Logical axes of KVCache.keys / .values, for sharding a cache made outside the model.
CACHE_AXES = ('layers', 'batch', 'length', 'heads', 'kv')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, transformers' `rope_parameters` beyond 'default'.

  'linear': every inverse frequency divided by `factor`.
  'llama3': frequencies with wavelength above original_max_position_embeddings /
    low_freq_factor divided by `factor`, below original / high_freq_factor kept, and
    interpolated in between (Llama 3.1).
  """
  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'rope scaling type {self.rope_type!r} is not supported; '
                       f'supported: {ROPE_TYPES}')


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Shape and numerics of the decoder.

  head_dim: None means hidden_size // num_heads (Qwen3 sets its own).
  qkv_bias / out_bias / mlp_bias: biases on q,k,v (Qwen2) / o_proj / the MLP projections.
  qk_norm: None, 'rms' (Qwen3) or 'chameleon' (see the module docstring).
  swin_norm: Chameleon's post-sublayer norm placement.
  suppressed_token_ids: vocabulary ids whose logits are float32 min (Chameleon's text head
    forbids its image tokens); () generates every token.
  dtype / param_dtype: compute and parameter dtypes.
  scan_layers: one `nn.scan` over layers, params stacked on a leading 'layers' axis.
  remat: recompute each layer's activations in the backward pass.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: str | None = None
  swin_norm: bool = False
  tie_word_embeddings: bool = False
  suppressed_token_ids: tuple[int, ...] = ()
  initializer_range: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                         f'num_heads={self.num_heads}; set head_dim')
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f'RoPE needs an even head_dim, got {self.head_dim}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f'qk_norm={self.qk_norm!r} is not one of {QK_NORMS}')
    object.__setattr__(self, 'suppressed_token_ids', tuple(self.suppressed_token_ids))
    bad = [t for t in self.suppressed_token_ids if not 0 <= t < self.vocab_size]
    if bad:
      raise ValueError(f'suppressed_token_ids {bad[:5]} are outside the vocabulary '
                       f'(vocab_size={self.vocab_size})')


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `max_length` slots, shared by all rows.

  A call with s new tokens writes them at slots [index, index + s) of every row (rows of a
  left-padded batch end together), so one scalar `index` serves the batch; `valid` records
  which slots hold real tokens and `lengths` how many real tokens each row has seen, which
  is the position of its next token.

  keys, values: (layers, b, max_length, kv_heads, head_dim), compute dtype.
  valid: (b, max_length) bool.
  lengths: (b,) int32.
  index: () int32, slots written so far.
  """
  keys: jax.Array
  values: jax.Array
  valid: jax.Array
  lengths: jax.Array
  index: jax.Array


def init_cache(config: LLMConfig, batch_size: int, max_length: int) -> KVCache:
  """An empty cache with room for `max_length` tokens (prompt, padding and new tokens)."""
  shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
  return KVCache(keys=jnp.zeros(shape, config.dtype), values=jnp.zeros(shape, config.dtype),
                 valid=jnp.zeros((batch_size, max_length), bool),
                 lengths=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32))


def rope_inverse_frequencies(config: LLMConfig) -> np.ndarray:
  """(head_dim // 2,) float32 inverse frequencies, scaled as config.rope_scaling says.

  Computed in float32 as transformers does, so angles agree to the last bits.
  """
  dim = config.head_dim
  inv = (1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
         ).astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv
  if scaling.rope_type == 'linear':
    return (inv / np.float32(scaling.factor)).astype(np.float32)
  old_len = np.float32(scaling.original_max_position_embeddings)
  low, high, factor = (np.float32(v) for v in (scaling.low_freq_factor, scaling.high_freq_factor,
                                               scaling.factor))
  wavelen = np.float32(2 * math.pi) / inv
  scaled = np.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: LLMConfig) -> RopeCosSin:
  """cos and sin of every channel's angle, (b, s, head_dim) float32 each (halves repeated)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(config))
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope_rotate_half(x: jax.Array, cos_sin: RopeCosSin) -> jax.Array:
  """Rotate-half RoPE: x * cos + [-x2, x1] * sin, in float32. (b, s, h, d) -> (b, s, h, d)."""
  cos, sin = (t[:, :, None, :] for t in cos_sin)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return (x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


def default_positions(mask: jax.Array, segment_ids: jax.Array | None = None,
                      offset: jax.Array | None = None) -> jax.Array:
  """Real tokens before each token (within its segment), plus `offset` (b,); pads get 0.

  mask: (b, s) bool. Returns (b, s) int32.
  """
  counts = jnp.cumsum(mask.astype(jnp.int32), axis=1)
  if segment_ids is not None:
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    # Real tokens before each segment's first token; non-decreasing, so a running max
    # carries every segment's value forward to its tokens.
    before = jnp.where(starts, counts - mask.astype(jnp.int32), 0)
    counts = counts - jax.lax.cummax(before, axis=1)
  positions = jnp.maximum(counts - 1, 0)
  return positions if offset is None else positions + offset[:, None]


class Projection(nn.Module):
  """x (..., *in) . kernel (*in, *out) [+ bias (*out)] -> (..., *out); N(0, std) init.

  `axes` names the kernel's axes (input ones first); the bias takes the output names.
  """
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  use_bias: bool
  config: LLMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    num_in = len(self.axes) - len(self.out_shape)
    kernel = self.param('kernel', initializers.normal(c.initializer_range, *self.axes),
                        x.shape[x.ndim - num_in:] + self.out_shape, c.param_dtype)
    y = jnp.tensordot(x.astype(c.dtype), kernel.astype(c.dtype), axes=num_in)
    if self.use_bias:
      bias = self.param('bias', initializers.zeros(*self.axes[num_in:]), self.out_shape,
                        c.param_dtype)
      y = y + bias.astype(c.dtype)
    return y


class ChameleonQKNorm(nn.Module):
  """Chameleon's per-head norm of queries or keys. Shapes: (b, s, heads, head_dim) -> same.

  LayerNorm statistics over head_dim only (eps 1e-5, fixed in transformers'
  ChameleonLayerNorm), then a (heads, head_dim) scale and bias: Chameleon was trained with
  its heads split over model-parallel ranks that each kept their own affine parameters.
  """
  config: LLMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, -1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + 1e-5)
    scale = self.param('scale', initializers.ones('heads', 'kv'), x.shape[-2:], jnp.float32)
    bias = self.param('bias', initializers.zeros('heads', 'kv'), x.shape[-2:], jnp.float32)
    return (y * scale + bias).astype(self.config.dtype)


def _qk_norm(c: LLMConfig, name: str) -> nn.Module:
  """Qwen3: RMSNorm over head_dim with one (head_dim,) scale; Chameleon: see above."""
  if c.qk_norm == 'rms':
    return RMSNorm(c.rms_norm_eps, dtype=c.dtype, scale_axis='kv', name=name)
  return ChameleonQKNorm(c, name=name)


class Attention(nn.Module):
  """Grouped-query causal self-attention with RoPE, reading and extending a layer's cache.

  Shapes: x (b, s, d); cos_sin (b, s, head_dim) each; mask (b, 1, s, t) bool with t = s
  without a cache, t = max_length with one; cache None or this layer's (keys, values), each
  (b, max_length, kv_heads, head_dim); index () int32 slot of the first new token.
  Returns (b, s, d) and, with a cache, the new tokens' (keys, values) (b, s, kv_heads,
  head_dim) for the caller to store.
  """
  config: LLMConfig

  @nn.compact
  def __call__(self, x, cos_sin, mask, cache, index):
    c = self.config
    q = Projection((c.num_heads, c.head_dim), ('embed', 'heads', 'kv'), c.qkv_bias, c,
                   name='q_proj')(x)
    # kv heads shard over 'heads' too; spec_for replicates them when tensor does not divide.
    k, v = (Projection((c.num_kv_heads, c.head_dim), ('embed', 'heads', 'kv'), c.qkv_bias, c,
                       name=name)(x) for name in ('k_proj', 'v_proj'))
    if c.qk_norm is not None:
      q, k = _qk_norm(c, 'q_norm')(q), _qk_norm(c, 'k_norm')(k)
    q, k = apply_rope_rotate_half(q, cos_sin), apply_rope_rotate_half(k, cos_sin)
    q, k, v = (nn.with_logical_constraint(t, ('batch', 'length', 'heads', 'kv'))
               for t in (q, k, v))
    new_kv = None
    if cache is not None:
      new_kv = (k, v)
      k, v = (jax.lax.dynamic_update_slice(old, new.astype(old.dtype), (0, index, 0, 0))
              for old, new in zip(cache, new_kv))
    # XLA's implementation takes logits and softmax in float32 and handles GQA itself.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return Projection((x.shape[-1],), ('heads', 'kv', 'embed'), c.out_bias, c,
                      name='o_proj')(out), new_kv


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). Shapes: (b, s, d) -> (b, s, d)."""
  config: LLMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate, up = (Projection((c.intermediate_size,), ('embed', 'mlp'), c.mlp_bias, c,
                           name=name)(x) for name in ('gate_proj', 'up_proj'))
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return Projection((c.hidden_size,), ('mlp', 'embed'), c.mlp_bias, c, name='down_proj')(hidden)


class DecoderLayer(nn.Module):
  """One decoder layer, in `nn.scan`'s (carry, inputs) -> (carry, outputs) form.

  Shapes: x (b, s, d) -> (b, s, d); see `Attention` for the other arguments and the second
  output.
  """
  config: LLMConfig

  @nn.compact
  def __call__(self, x, cos_sin, mask, cache, index):
    c = self.config
    norm1 = RMSNorm(c.rms_norm_eps, dtype=c.dtype, name='input_layernorm')
    norm2 = RMSNorm(c.rms_norm_eps, dtype=c.dtype, name='post_attention_layernorm')
    attention, mlp = Attention(c, name='self_attn'), MLP(c, name='mlp')
    if c.swin_norm:
      attended, new_kv = attention(x, cos_sin, mask, cache, index)
      h = x + norm1(attended)
      out = h + norm2(mlp(h))
    else:
      attended, new_kv = attention(norm1(x), cos_sin, mask, cache, index)
      h = x + attended
      out = h + mlp(norm2(h))
    return nn.with_logical_constraint(out, ('batch', 'length', 'embed')), new_kv


class LLM(nn.Module):
  """The decoder LM. `apply(variables, input_ids)` -> (b, s, vocab) float32 logits.

  Methods (pass as `method=` to apply): `embed` ids -> embeddings, `hidden_states` (the
  final-normed states, e.g. for other heads), `logits` (the LM head), `__call__` (both).
  """
  config: LLMConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
        embedding_init=initializers.normal(c.initializer_range, 'vocab', 'embed'))
    layer_cls = nn.remat(DecoderLayer, prevent_cse=not c.scan_layers) if c.remat else DecoderLayer
    if c.scan_layers:
      self.layers = nn.scan(layer_cls, variable_axes={'params': 0}, split_rngs={'params': True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                            length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: 'layers'})(c)
    else:
      self.layers = [layer_cls(c) for _ in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, dtype=c.dtype)
    if not c.tie_word_embeddings:
      self.lm_head = self.param('lm_head',
                                initializers.normal(c.initializer_range, 'embed', 'vocab'),
                                (c.hidden_size, c.vocab_size), c.param_dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(b, s) int ids -> (b, s, hidden_size) embeddings in the compute dtype."""
    return nn.with_logical_constraint(self.embed_tokens(input_ids), ('batch', 'length', 'embed'))

  def hidden_states(self, input_ids: jax.Array | None = None, *,
                    inputs_embeds: jax.Array | None = None,
                    positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None,
                    attention_mask: jax.Array | None = None,
                    cache: KVCache | None = None):
    """Final-normed hidden states. See `__call__` for the arguments.

    Returns:
      (b, s, hidden_size) in the compute dtype; with a cache, (states, updated cache).
    """
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('pass exactly one of input_ids and inputs_embeds')
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(c.dtype)
    chex.assert_rank(x, 3)
    b, s, _ = x.shape
    if cache is not None and segment_ids is not None:
      raise ValueError('segment_ids (packed sequences) cannot be used with a KV cache')
    real = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
      if positions is None:
        positions = default_positions(real, segment_ids)
      keep = jnp.tril(jnp.ones((s, s), bool))[None] & real[:, None, :]
      if segment_ids is not None:
        keep &= segment_ids[:, :, None] == segment_ids[:, None, :]
      layer_cache, index = None, None
    else:
      if positions is None:
        positions = default_positions(real, offset=cache.lengths)
      valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
      slots = jnp.arange(valid.shape[1])
      keep = (slots[None, :] <= cache.index + jnp.arange(s)[:, None])[None] & valid[:, None, :]
      layer_cache, index = (cache.keys, cache.values), cache.index
    mask = keep[:, None]
    cos_sin = rope_cos_sin(positions, c)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    if c.scan_layers:
      x, new_kv = self.layers(x, cos_sin, mask, layer_cache, index)
    else:
      per_layer = []
      for i, layer in enumerate(self.layers):
        this_cache = None if cache is None else (cache.keys[i], cache.values[i])
        x, kv = layer(x, cos_sin, mask, this_cache, index)
        per_layer.append(kv)
      new_kv = None if cache is None else tuple(jnp.stack(t) for t in zip(*per_layer))
    x = self.norm(x)
    if cache is None:
      return x
    keys, values = (
        nn.with_logical_constraint(
            jax.lax.dynamic_update_slice(old, new.astype(old.dtype), (0, 0, cache.index, 0, 0)),
            CACHE_AXES)
        for old, new in zip((cache.keys, cache.values), new_kv))
    return x, KVCache(keys=keys, values=values, valid=valid,
                      lengths=cache.lengths + jnp.sum(real, axis=1, dtype=jnp.int32),
                      index=cache.index + s)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(b, s, hidden_size) -> (b, s, vocab) float32; suppressed tokens get float32 min."""
    c = self.config
    if c.tie_word_embeddings:
      logits = self.embed_tokens.attend(hidden.astype(c.dtype))
    else:
      logits = jnp.dot(hidden.astype(c.dtype), self.lm_head.astype(c.dtype))
    logits = logits.astype(jnp.float32)
    if c.suppressed_token_ids:
      suppressed = np.zeros((c.vocab_size,), bool)
      suppressed[list(c.suppressed_token_ids)] = True
      logits = jnp.where(suppressed, jnp.finfo(jnp.float32).min, logits)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))

  def __call__(self, input_ids: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               cache: KVCache | None = None):
    """Next-token logits.

    Args:
      input_ids: (b, s) int token ids, or
      inputs_embeds: (b, s, hidden_size) embeddings instead (e.g. `embed(ids)` with visual
        features spliced in).
      positions: (b, s) int RoPE positions; default `default_positions` (real tokens
        before each token, per segment, continuing from the cache's lengths).
      segment_ids: (b, s) int; attention stays within runs of equal ids (packed
        documents). Not with a cache.
      attention_mask: (b, s) 1 for real tokens, 0 for padding (left-padded batches).
      cache: a KVCache; the s tokens are written at its next slots.
    Returns:
      (b, s, vocab) float32 logits; with a cache, (logits, updated cache).
    """
    out = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                             segment_ids=segment_ids, attention_mask=attention_mask, cache=cache)
    if cache is None:
      return self.logits(out)
    hidden, cache = out
    return self.logits(hidden), cache
