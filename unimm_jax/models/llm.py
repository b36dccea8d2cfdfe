"""Decoder-only language model shared by every unified model (Qwen2, Qwen3, Llama, Chameleon,
Bailing MoE / Ling).

Layer (pre-norm, the default):  h = x + attn(norm1(x));  out = h + mlp(norm2(h))
Layer (Chameleon `swin_norm`):   h = x + norm1(attn(x));  out = h + norm2(mlp(h))
attn: `unimm_jax.nn.attention.MultiHeadAttention` in transformers' parameter layout:
  grouped-query attention (num_kv_heads divides num_heads), softmax scale 1/sqrt(head_dim),
  optional q/k/v biases (Qwen2), optional q/k norm applied per head before RoPE (Qwen3:
  RMSNorm over head_dim, one scale shared by all heads; Chameleon: LayerNorm over head_dim,
  eps 1e-5, no statistics across heads, then a per-head scale and bias of shape (heads,
  head_dim)), RoPE in the rotate-half convention (channel i pairs with i + head_dim/2), then
  the output projection.
mlp: `unimm_jax.nn.mlp.SwiGLU`, down(silu(gate(x)) * up(x)); with num_experts > 0, layers
  from `first_k_dense_replace` on use `unimm_jax.nn.moe.MoEFeedForward` instead (top-k routed
  SwiGLU experts plus shared experts; params still under `mlp`).
Then a final RMSNorm and the LM head (its own kernel, or the token embedding when tied;
`norm_head` divides each hidden unit's column of the head kernel by its L2 norm over the
vocabulary, the norm treated as a constant in the backward pass, as Bailing's `norm_head`).

MoE statistics: each MoE layer's load-balance loss and expert load (`nn.moe`) are sown into
the 'intermediates' collection as `router_aux_loss` (the mean over MoE layers, float32 ())
and `expert_load` (num MoE layers, num_experts); apply with `mutable='intermediates'` and
read them with `moe_stats`. The loss is unweighted: a task multiplies it by its config.loss
weight. Without `mutable` the sow is a no-op; dense models sow nothing.

Sequences: `attention_mask` (b, s) marks real tokens (left-padded batches), `segment_ids`
(b, s) restricts attention to tokens of the same segment (packed documents), and `mask` (a
`unimm_jax.nn.masks.MaskSpec`) says which tokens see which: causal by default, or
bidirectional, block-causal, prefix, or causal with bidirectional spans (an image). Positions
default to the count of real tokens before each token (restarting per segment), as
transformers numbers a left-padded batch.

KV cache: an explicit `KVCache` pytree passed in and returned (see `init_cache`), so a
decode loop is a plain `jax.lax.while_loop` and works the same with scanned layers. Each
layer writes its new keys and values into the cache in place (`unimm_jax.nn.kv_cache`).
"""
import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.nn import initializers
from unimm_jax.nn import kv_cache
from unimm_jax.nn import masks
from unimm_jax.nn import moe
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.kv_cache import CACHE_AXES, KVCache
from unimm_jax.nn.mlp import SwiGLU
from unimm_jax.nn.norms import RMSNorm
from unimm_jax.nn.rope import RopeScaling, rope_1d_angles, rope_inverse_frequencies

Dtype = Any

QK_NORMS = (None, 'rms', 'chameleon')
_ATTENTION_QK_NORMS = {None: None, 'rms': 'rms', 'chameleon': 'layernorm'}
__all__ = ['CACHE_AXES', 'KVCache', 'LLM', 'LLMConfig', 'RopeScaling', 'default_positions',
           'init_cache', 'moe_stats', 'num_dense_prefix']


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
  attention_impl: `jax.nn.dot_product_attention`'s implementation: 'xla' (every backend),
    'cudnn' (fused kernel on NVIDIA GPUs) or None (JAX chooses).
  dropout_rate: dropout on each sublayer's output before it joins the residual stream
    (Chameleon's `dropout`); active only when `apply` gets a 'dropout' rng.
  norm_head: Bailing's normalised LM head (module docstring).
  num_experts: 0 for a dense model; else the routed experts of each MoE layer.
  num_experts_per_tok: top k; moe_intermediate_size: each expert's SwiGLU width;
  num_shared_experts: shared experts, one SwiGLU of num_shared_experts *
    moe_intermediate_size; first_k_dense_replace: the first layers keep the dense MLP
    (intermediate_size); norm_topk_prob: renormalise the top-k weights to sum 1;
  num_routers: 1, or 3 for Bailing's multi_gate (text, image, audio routers, chosen per token
    by `gate_ids`); moe_dispatch: 'dense' or 'ragged' (`unimm_jax.nn.moe`: same result,
    different cost and sharding).
  With scan_layers, a dense prefix (first_k_dense_replace > 0) is its own scan
  (`dense_layers`) before the MoE layers' (`layers`).
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
  attention_impl: str | None = 'xla'
  dropout_rate: float = 0.0
  norm_head: bool = False
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  num_shared_experts: int = 0
  first_k_dense_replace: int = 0
  norm_topk_prob: bool = True
  num_routers: int = 1
  moe_dispatch: str = 'dense'

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
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'dropout_rate={self.dropout_rate} must be in [0, 1)')
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f'qk_norm={self.qk_norm!r} is not one of {QK_NORMS}')
    if self.num_experts:
      if not 1 <= self.num_experts_per_tok <= self.num_experts:
        raise ValueError(f'num_experts_per_tok={self.num_experts_per_tok} must be in 1..'
                         f'num_experts={self.num_experts}')
      if self.moe_intermediate_size <= 0:
        raise ValueError('an MoE model (num_experts > 0) needs moe_intermediate_size > 0')
      if self.moe_dispatch not in moe.DISPATCHES:
        raise ValueError(f'moe_dispatch={self.moe_dispatch!r} is not one of {moe.DISPATCHES}')
      if not 1 <= self.num_routers <= len(moe.ROUTER_NAMES):
        raise ValueError(f'num_routers={self.num_routers} is not in '
                         f'1..{len(moe.ROUTER_NAMES)}')
    if self.norm_head and self.tie_word_embeddings:
      raise ValueError('norm_head needs an untied LM head (tie_word_embeddings=False)')
    object.__setattr__(self, 'suppressed_token_ids', tuple(self.suppressed_token_ids))
    bad = [t for t in self.suppressed_token_ids if not 0 <= t < self.vocab_size]
    if bad:
      raise ValueError(f'suppressed_token_ids {bad[:5]} are outside the vocabulary '
                       f'(vocab_size={self.vocab_size})')

  def is_moe_layer(self, i: int) -> bool:
    return self.num_experts > 0 and i >= self.first_k_dense_replace


# MoE fields a config's `model` may set (configs/lm.py:moe); absent means dense.
_MOE_FIELDS = dict(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0,
                   num_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=True,
                   num_routers=1, moe_dispatch='dense')


def config_from_fields(model, vocab_size: int = 0) -> LLMConfig:
  """LLMConfig from a config's `model` fields (configs/lm.py); vocab_size 0 there takes
  `vocab_size` (the tokenizer's)."""
  return LLMConfig(
      vocab_size=model.vocab_size or vocab_size,
      hidden_size=model.hidden_size,
      intermediate_size=model.intermediate_size,
      num_layers=model.num_layers,
      num_heads=model.num_heads,
      num_kv_heads=model.num_kv_heads,
      head_dim=model.head_dim or None,
      rope_theta=model.rope_theta,
      rms_norm_eps=model.rms_norm_eps,
      qkv_bias=model.qkv_bias,
      qk_norm=model.qk_norm or None,
      swin_norm=model.get('swin_norm', False),
      tie_word_embeddings=model.tie_word_embeddings,
      dtype=compute_dtype(model.dtype, 'config.model.dtype'),
      scan_layers=model.scan_layers,
      remat=model.remat,
      attention_impl=model.attention_impl,
      dropout_rate=model.get('dropout_rate', 0.0),
      **{name: model.get(name, default) for name, default in _MOE_FIELDS.items()},
  )


def init_cache(config: LLMConfig, batch_size: int, max_length: int) -> KVCache:
  """An empty cache with room for `max_length` tokens (prompt, padding and new tokens)."""
  return kv_cache.init_cache(config.num_layers, batch_size, max_length, config.num_kv_heads,
                             config.head_dim, config.dtype)


def num_dense_prefix(c: LLMConfig) -> int:
  """With scan_layers, the leading dense layers of an MoE model that form their own scan
  (`dense_layers`); 0 when every layer is of one kind (all in `layers`)."""
  if c.num_experts and c.first_k_dense_replace < c.num_layers:
    return c.first_k_dense_replace
  return 0  # a dense model, or an MoE model whose layers are all dense


def moe_stats(mutated: dict) -> dict[str, jax.Array]:
  """`router_aux_loss` () and `expert_load` (num MoE layers, E) from the variables that
  `apply(..., mutable='intermediates')` returned; {} for a dense model."""
  sown = mutated.get('intermediates', {})
  return {name: sown[name][0] for name in ('router_aux_loss', 'expert_load') if name in sown}


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


class DecoderLayer(nn.Module):
  """One decoder layer, in `nn.scan`'s (carry, inputs) -> (carry, outputs) form.

  Shapes: carry = (x (b, s, d), cache: a `kv_cache.LayerCache` over every layer's slots, or
  None); layer () int32, this layer's index into the cache; angles (b, s, head_dim // 2)
  rotary angles; mask (b, 1, s, t) bool with t = s without a cache, t = max_length with one;
  token_mask (b, s) bool, the tokens an MoE's balance loss counts; gate_ids (b, s) int or
  None, each token's router (MoE with several). Returns ((x, cache), aux): aux the MoE
  layer's `moe.MoEAux`, None for a dense layer (`moe` False).
  """
  config: LLMConfig
  moe: bool = False

  @nn.compact
  def __call__(self, carry, layer, angles, mask, token_mask=None, gate_ids=None):
    c = self.config
    x, cache = carry
    norm1 = RMSNorm(c.rms_norm_eps, dtype=c.dtype, name='input_layernorm')
    norm2 = RMSNorm(c.rms_norm_eps, dtype=c.dtype, name='post_attention_layernorm')
    attention = MultiHeadAttention(
        c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, qkv_bias=c.qkv_bias,
        out_bias=c.out_bias, qk_norm=_ATTENTION_QK_NORMS[c.qk_norm],
        qk_norm_eps=c.rms_norm_eps if c.qk_norm == 'rms' else 1e-5, rope='rotate_half',
        param_layout='hf', kernel_stddev=c.initializer_range, implementation=c.attention_impl,
        dtype=c.dtype, param_dtype=c.param_dtype, name='self_attn')
    if self.moe:
      moe_ffn = moe.MoEFeedForward(
          c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
          num_shared_experts=c.num_shared_experts, norm_topk_prob=c.norm_topk_prob,
          num_routers=c.num_routers, dispatch=c.moe_dispatch,
          kernel_stddev=c.initializer_range, dtype=c.dtype, param_dtype=c.param_dtype,
          name='mlp')
      mlp = lambda h: moe_ffn(h, token_mask, gate_ids)  # (y, MoEAux)
    else:
      swiglu = SwiGLU(c.intermediate_size, use_bias=c.mlp_bias, layout='hf',
                      kernel_stddev=c.initializer_range, dtype=c.dtype,
                      param_dtype=c.param_dtype, name='mlp')
      mlp = lambda h: (swiglu(h), None)

    # Training passes a 'dropout' rng; inference and evaluation do not.
    dropout = nn.Dropout(c.dropout_rate, deterministic=not self.has_rng('dropout'))

    def attend(h):
      if cache is None:
        return attention(h, angles=angles, mask=mask), None
      return attention(h, angles=angles, mask=mask, cache=cache.replace(layer=layer))

    if c.swin_norm:
      attended, cache = attend(x)
      h = x + dropout(norm1(attended))
      y, aux = mlp(h)
      out = h + dropout(norm2(y))
    else:
      attended, cache = attend(norm1(x))
      h = x + dropout(attended)
      y, aux = mlp(norm2(h))
      out = h + dropout(y)
    return (nn.with_logical_constraint(out, ('batch', 'length', 'embed')), cache), aux


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
      # Layers of one kind per scan: a dense prefix of an MoE model is a scan of its own.
      first = num_dense_prefix(c)
      scan = lambda length, is_moe: nn.scan(
          layer_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=(0,) + (nn.broadcast,) * 4, length=length,
          metadata_params={nn.PARTITION_NAME: 'layers'})(c, moe=is_moe)
      self.dense_layers = scan(first, False) if first else None
      self.layers = scan(c.num_layers - first, c.is_moe_layer(first))
    else:
      self.layers = [layer_cls(c, moe=c.is_moe_layer(i)) for i in range(c.num_layers)]
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
                    mask: masks.MaskSpec | None = None,
                    cache: KVCache | None = None,
                    gate_ids: jax.Array | None = None):
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
    if mask is None:
      mask = masks.causal(b, s, offset=0 if cache is None else cache.index)
    if mask.shape != (b, s):
      raise ValueError(f'mask spec of shape {mask.shape} for a ({b}, {s}) batch')
    key_order = masks.with_padding(mask, real).order
    if cache is None:
      if positions is None:
        positions = default_positions(real, segment_ids)
      dense = masks.dense_mask(mask.order, key_order, segment_ids, segment_ids)
      layer_cache = None
    else:
      if positions is None:
        positions = default_positions(real, offset=cache.lengths)
      order = jax.lax.dynamic_update_slice(cache.order, key_order, (0, cache.index))
      dense = masks.dense_mask(mask.order, order)
      # Under nn.scan the layer index is traced, so the carry holds it as an array from the start.
      first = jnp.zeros((), jnp.int32) if c.scan_layers else 0
      layer_cache = kv_cache.LayerCache(cache.keys, cache.values, first, cache.index)
    angles = rope_1d_angles(positions, rope_inverse_frequencies(c.head_dim, c.rope_theta,
                                                                c.rope_scaling))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    routing = (real, gate_ids)
    if c.scan_layers:
      first = num_dense_prefix(c)
      if first:
        (x, layer_cache), _ = self.dense_layers((x, layer_cache), jnp.arange(first), angles,
                                                dense, *routing)
      (x, layer_cache), aux = self.layers((x, layer_cache), jnp.arange(first, c.num_layers),
                                          angles, dense, *routing)
    else:
      per_layer = []
      for i, layer in enumerate(self.layers):
        (x, layer_cache), layer_aux = layer((x, layer_cache), i, angles, dense, *routing)
        per_layer.append(layer_aux)
      per_layer = [a for a in per_layer if a is not None]
      aux = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer else None
    if aux is not None:  # (num MoE layers, ...) stacked MoEAux
      self.sow('intermediates', 'router_aux_loss', jnp.mean(aux.balance_loss))
      self.sow('intermediates', 'expert_load', aux.expert_load)
    x = self.norm(x)
    if cache is None:
      return x
    keys, values = (nn.with_logical_constraint(t, CACHE_AXES)
                    for t in (layer_cache.keys, layer_cache.values))
    return x, KVCache(keys=keys, values=values, order=order,
                      lengths=cache.lengths + jnp.sum(real, axis=1, dtype=jnp.int32),
                      index=cache.index + s)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(b, s, hidden_size) -> (b, s, vocab) float32; suppressed tokens get float32 min."""
    c = self.config
    if c.tie_word_embeddings:
      logits = self.embed_tokens.attend(hidden.astype(c.dtype))
    else:
      head = self.lm_head
      if c.norm_head:  # Bailing: each hidden unit's column over the vocabulary to norm 1
        norm = jnp.linalg.norm(head.astype(jnp.float32), axis=1, keepdims=True)
        head = head / jax.lax.stop_gradient(norm + 1e-7).astype(head.dtype)
      logits = jnp.dot(hidden.astype(c.dtype), head.astype(c.dtype))
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
               mask: masks.MaskSpec | None = None,
               cache: KVCache | None = None,
               gate_ids: jax.Array | None = None):
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
      mask: which tokens see which (`unimm_jax.nn.masks`); default causal. With a cache its
        orders continue the cache's (`masks.causal(b, s, offset=cache.index)`).
      cache: a KVCache; the s tokens are written at its next slots.
      gate_ids: (b, s) int, each token's router in an MoE with several (Bailing's
        multi_gate: 0 text, 1 image, 2 audio); default 0. Ignored with one router.
    Returns:
      (b, s, vocab) float32 logits; with a cache, (logits, updated cache).
    """
    out = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                             segment_ids=segment_ids, attention_mask=attention_mask, mask=mask,
                             cache=cache, gate_ids=gate_ids)
    if cache is None:
      return self.logits(out)
    hidden, cache = out
    return self.logits(hidden), cache
