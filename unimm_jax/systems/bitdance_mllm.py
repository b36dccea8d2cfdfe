"""BitDance's unified MLLM on UniWeTok's binary tokens (UniWeTok paper sec 4, Tables 11-13:
UniWeTok-Gen / -Edit / -Chat; SPECS 1; the authors' BitDance code, modeling/mllm.py).

Images are a frozen UniWeTok's (D, D) grid of d-bit tokens in {-1, +1} (d = groups x group
bits), in the 'blocks' layout of `unimm_jax.data.mllm_sequence`:

  read   [BOI] [res] [res] {D^2 slots} [EOI]                      (a user's image: Chat, Edit)
  write  [BOI] [res] [res] {P - 1 queries} {D^2 slots} [EOI]      (Gen, Edit)

[res] is their <res_D> token (D tokens per side; their unit is the 16 px of their
autoencoder, here the tokenizer's downsampling). Every slot, read or written, holds
connector(bits) + a 2D sin-cos position embedding (their `embed_vision_mlp`,
Linear-GELU(tanh)-Linear, and `get_2d_embed`); the tokens are in their patch order
(sqrt(P) x sqrt(P) patches in raster order). Attention is causal except in a written image,
where [res_w] with the queries, then each P consecutive slots, are bidirectional blocks
(their `create_sparse_mask`: the first two tokens of the image span causal, then blocks of
P). The hidden states of a block, plus the position embeddings of the next P tokens,
condition the binary diffusion head (`models.bit_diffusion`, parallel: the P tokens
denoised jointly with one t) that writes the next block: position t predicts slot t + P.
[BOI] and [EOI] are LM-head targets; the bits are not vocabulary ids.

Training (`generation_losses`, term 'bitdiff'): the clamped v-loss of the head on every
written block (logit-normal t, `noise_repeats` draws); the bits fed back in are flipped with
probability `bit_flip` u (their vision_perturb 0.1, only tokens to be generated). Their loss
weights text 0.01, images 1 (config.loss.ce, config.loss.bitdiff).

Generation (`image_step`): the prompt ends with the image opening ([BOI] [res] [res] and the
queries, one bidirectional block); each loop step samples the next P tokens by
Euler-Maruyama (`bit_diffusion.euler_maruyama`, config.generation.num_steps) from the last P
hidden states of the streams, guided on v with a constant scale (their text-to-image CFG;
editing guides against the stream that keeps the images and drops the instruction, as their
`remove_first_user_block`, leaving the blank stream unused), takes sign(), and feeds
connector(bits) + positions back as one block. UniWeTok's decoder renders the bits. Edits
keep every image in context as bits (`edits_in_context`).

Params: {'llm', 'connector', 'head'}; frozen: {'vq': UniWeTok's variables} from
config.system.tokenizer_path (a UniWeTok workdir or the authors' .safetensors; empty =
random, plumbing tests only). A fresh run starts the LLM from config.model.init_path (a
transformers Qwen3 directory), or the whole model (LLM, head, connector) from
config.system.weights_path, a state dict of the authors' MLLModel. Their released
BitDance-14B reads its own autoencoder's 32-bit tokens (ch 256, z 32), not UniWeTok's: its
LLM and head load, and its connector only onto a UniWeTok of 32 bits per token; the UniWeTok
paper's MLLM weights are not public.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.convert import bitdance_mllm_weights
from unimm_jax.data.mllm_sequence import ImageSlots
from unimm_jax.inference import generation_loop
from unimm_jax.losses import diffusion
from unimm_jax.models import bit_diffusion
from unimm_jax.models import llm
from unimm_jax.nn import masks
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.embeddings import patch_order, sincos_2d
from unimm_jax.nn.mlp import Projector
from unimm_jax.systems import tokenizers
from unimm_jax.systems.mllm_interface import (Embedded, FrozenTokenizer, UnifiedSystem,
                                               shift_left, slot_predictors, take_slots)

# The diffusion loss's key when the task passes none (evaluation): fixed, so eval losses
# repeat.
_EVAL_NOISE_SEED = 4321


def _rows(values: jax.Array, index: jax.Array) -> jax.Array:
  """values (b, L, ...) at index (b, m) -> (b, m, ...)."""
  return jax.vmap(lambda v, i: v[i])(values, index)


class BitDanceMLLM(FrozenTokenizer, UnifiedSystem):
  """See the module docstring. Config: model (LLM), vq (a UniWeTok model config), system
  (name, tokenizer_path, weights_path, image_size, parallel), head (width, depth,
  adaln_blocks, head_dim, bounded, swiglu, noise_repeats, t_mean, t_std, time_shift,
  bit_flip, dtype), generation
  (num_steps), tokens (pad, bos, eos, boi, eoi, size_base, query_base)."""
  codes_in_vocabulary = False
  tokenizer_name = 'UniWeTok'
  edits_in_context = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.vq.name != 'uniwetok':
      raise ValueError(f'config.vq.name={config.vq.name!r}: this system reads the binary '
                       'tokens of a UniWeTok tokenizer')
    spec = tokenizers.spec(config.vq)
    factor, size, p = spec.downsample_factor(config.vq), config.system.image_size, \
        config.system.parallel
    patch = math.isqrt(max(p, 1))
    if size % factor or patch * patch != p or (size // factor) % patch:
      raise ValueError(f'config.system: image_size={size} must be a multiple of the '
                       f'tokenizer\'s downsampling {factor}, and parallel={p} a square whose '
                       f'side divides the {size // factor} tokens per side')
    side = size // factor
    self.parallel, self.generation_block = p, p
    self.image_slots = ImageSlots(image_size=size, discrete_side=side, size_unit=factor,
                                  anyres=None, layout='blocks', queries=p - 1)
    self._build_llm_with_markers()
    t = self.config.tokens
    self.ids = dataclasses.replace(self.ids, size_base=t.size_base,
                                   query_base=t.query_base if p > 1 else None)
    top = max(t.size_base + side, (t.query_base + p - 2) if p > 1 else 0)
    if top >= self.llm.config.vocab_size:
      raise ValueError(f'config.model.vocab_size={self.llm.config.vocab_size} cannot hold the '
                       f'size and query ids (largest {top}, config.tokens)')
    self.vq = spec.build(config.vq)
    self.latent_dim = config.vq.groups * config.vq.group_bits
    width = self.llm.config.hidden_size
    self.connector = Projector(width, width, approximate_gelu=True,
                               dtype=self.llm.config.dtype)
    h = config.head
    self.head = bit_diffusion.BitDiffusionHead(
        h.width, h.depth, h.adaln_blocks, attention_heads=h.width // h.head_dim if p > 1 else 0,
        bounded=h.bounded, swiglu=h.get('swiglu', True),  # runs saved before the field: True
        dtype=compute_dtype(h.dtype, 'config.head.dtype'))
    # Sequence position -> grid cell, and the position embedding of each sequence position.
    self.cells = patch_order(side, side, patch)
    self.positions = jnp.asarray(sincos_2d(side, side, width, patch))

  # ---- params ----------------------------------------------------------------------------

  def init_params(self, rng: jax.Array) -> dict:
    llm_rng, connector_rng, head_rng = jax.random.split(rng, 3)
    width, p, d = self.llm.config.hidden_size, self.parallel, self.latent_dim
    return {
        'llm': self.llm.init(llm_rng, jnp.zeros((1, 4), jnp.int32))['params'],
        'connector': self.connector.init(connector_rng, jnp.zeros((1, d)))['params'],
        'head': self.head.init(head_rng, jnp.zeros((1, p, d)), jnp.zeros((1, p)),
                               jnp.zeros((1, p, width)))['params'],
    }

  def initial_weights(self) -> dict | None:
    """A fresh run's starting weights: with config.system.weights_path (the authors'
    MLLModel state dict, .safetensors) the LLM, head and connector from it
    (`convert.bitdance_mllm_weights`: a tensor that does not fit this config is named);
    otherwise the LLM from config.model.init_path, if set."""
    path = self.config.system.get('weights_path', '')
    if not path:
      return super().initial_weights()
    if self.config.model.get('init_path', ''):
      raise ValueError('set one of config.system.weights_path (the whole MLLM) and '
                       'config.model.init_path (the LLM alone)')
    parts = bitdance_mllm_weights.load_mllm_heads(
        path, self.head, latent_dim=self.latent_dim, hidden_size=self.llm.config.hidden_size)
    return {'llm': bitdance_mllm_weights.convert_llm(path, self.llm.config).sources, **parts}

  # ---- sequences --------------------------------------------------------------------------

  def image_latents(self, frozen: dict, images: jax.Array) -> jax.Array:
    """images (b, I, S, S, 3) -> their bits (b, I, D^2, d) in {-1, +1}, sequence order,
    stop-gradient: the only place pixels enter."""
    b, i = images.shape[:2]
    bits = self.vq.apply(frozen['vq'], images.reshape((b * i,) + images.shape[2:]),
                         method='encode').latents
    bits = bits.reshape(b * i, -1, self.latent_dim)[:, self.cells]
    return jax.lax.stop_gradient(bits.reshape(b, i, -1, self.latent_dim))

  def token_inputs(self, params: dict, bits: jax.Array, first: jax.Array | int = 0
                   ) -> jax.Array:
    """bits (b, m, d) of sequence positions [first, first + m) of one image -> LLM inputs
    (b, m, width) float32: connector(bits) + their position embeddings."""
    x = self.connector.apply({'params': params['connector']}, bits.astype(jnp.float32))
    positions = jax.lax.dynamic_slice_in_dim(self.positions, first, bits.shape[1])
    return x.astype(jnp.float32) + positions

  def embed(self, params, frozen, batch, *, train, rng) -> Embedded:
    tokens = batch['tokens']
    embeds = self.llm.apply({'params': params['llm']}, tokens, method=llm.LLM.embed)
    if 'image_latents' in batch:
      latents = batch['image_latents']
    elif batch['images'].shape[1]:
      latents = self.image_latents(frozen, batch['images'])
    else:
      return Embedded(embeds=embeds, tokens=tokens)
    b, i, n, d = latents.shape
    bits = latents.reshape(b, i * n, d).astype(jnp.float32)
    inputs = bits
    flip = self.config.head.bit_flip
    if train and rng is not None and flip:
      # Only the tokens the model learns to write are perturbed (their vision_perturb).
      written = jax.vmap(lambda w, v: w.at[jnp.maximum(v, 0)].max(v >= 0))(
          jnp.zeros((b, i * n), bool), batch['discrete_index'])
      inputs = jnp.where(written[..., None], diffusion.flip_bits(rng, bits, flip), bits)
    inputs = self.token_inputs(params, inputs.reshape(b * i, n, d)).reshape(b, i * n, -1)
    inputs = inputs.astype(embeds.dtype)
    for index in (batch['continuous_index'], batch['discrete_index']):
      embeds = jnp.where(index[..., None] >= 0, take_slots(inputs, index), embeds)
    return Embedded(embeds=embeds, tokens=tokens,
                    image_targets=take_slots(bits, batch['discrete_index']))

  def attention(self, batch: dict) -> masks.MaskSpec | None:
    """Causal, with each written image's [res_w] + queries and each run of P slots one
    bidirectional block (module docstring)."""
    if self.parallel == 1:
      return None
    tokens, index = batch['tokens'], batch['discrete_index']
    first_query = self.ids.query_base
    queries = (tokens >= first_query) & (tokens < first_query + self.parallel - 1)
    opening = queries | (shift_left(tokens) == first_query)
    spans = jnp.where(index >= 0, 2 + 2 * (index // self.parallel),
                      opening.astype(jnp.int32))
    return masks.with_bidirectional_spans(masks.causal(*tokens.shape), spans)

  def generation_losses(self, params, hidden, batch, embedded, rng, *, train):
    """{'bitdiff'}: the head's v-loss on every written block, conditioned on the hidden
    states P positions earlier plus the targets' position embeddings; mean over blocks."""
    if embedded.image_targets is None:
      return {}
    p, n = self.parallel, self.image_slots.codes_per_image
    images = batch['image_latents' if 'image_latents' in batch else 'images'].shape[1]
    order, valid = slot_predictors(batch, images * n, lead=p)
    target_at = jnp.minimum(order + p, hidden.shape[1] - 1)
    targets = _rows(embedded.image_targets, target_at)
    position = jnp.maximum(_rows(batch['discrete_index'], target_at), 0) % n
    cond = _rows(hidden, order).astype(jnp.float32) + self.positions[position]
    blocks = lambda x: x.reshape((-1, p) + x.shape[2:])
    weights = blocks(valid).min(axis=1)
    h = self.config.head
    rng = jax.random.key(_EVAL_NOISE_SEED) if rng is None else rng
    denoise = lambda z, t, c: self.head.apply({'params': params['head']}, z, t, c)
    loss, _ = bit_diffusion.denoising_loss(
        denoise, blocks(targets), blocks(cond), rng, repeats=h.noise_repeats, t_mean=h.t_mean,
        t_std=h.t_std, shift=h.time_shift, t_per_row=p > 1, row_weights=weights)
    return {'bitdiff': loss}

  # ---- generation -------------------------------------------------------------------------

  def answer_step(self, params):
    allowed = np.ones(self.llm.config.vocab_size, bool)
    side, p = self.image_slots.discrete_side, self.parallel
    allowed[[self.ids.boi, self.ids.eoi, self.ids.pad, self.ids.size_token(side)]] = False
    if p > 1:
      allowed[self.ids.query_base:self.ids.query_base + p - 1] = False
    return generation_loop.greedy_text_step(self.llm, params['llm'], jnp.asarray(allowed),
                                            self.ids.eos), ()

  def image_step(self, params, frozen, *, cfg_scale, temperature, top_k, top_p, batch_size):
    """State: (bits (b, D^2, d) so far, the last step's key, which the decoder's noise map
    reads). top_k / top_p do not apply to a diffusion head (refused when given)."""
    if top_k is not None or top_p is not None:
      raise ValueError('BitDance samples binary tokens with a diffusion head: top_k / top_p '
                       'do not apply')
    n, p, d = self.image_slots.codes_per_image, self.parallel, self.latent_dim
    g, h = self.config.generation, self.config.head
    denoise = lambda z, t, c: self.head.apply({'params': params['head']}, z, t, c)

    def step_fn(hidden, state, rng, step):
      bits, _ = state
      if len(hidden) > 3:
        raise ValueError(f'{len(hidden)} streams: BitDance guides with at most 3')
      hidden = [x[:, None] if p == 1 else x for x in hidden]  # (b, P, width) each
      positions = jax.lax.dynamic_slice_in_dim(self.positions, step * p, p)
      cond = [x.astype(jnp.float32) + positions for x in hidden]
      velocity = bit_diffusion.guided_velocity(denoise, cond[0],
                                               cond[1] if len(cond) > 1 else None, cfg_scale)
      z = bit_diffusion.euler_maruyama(velocity, rng, (cond[0].shape[0], p, d),
                                       num_steps=g.num_steps, shift=h.time_shift,
                                       temperature=temperature)
      block = jnp.where(z > 0, 1.0, -1.0)
      fed = self.token_inputs(params, block, step * p).astype(self.llm.config.dtype)
      bits = jax.lax.dynamic_update_slice(bits, block, (0, step * p, 0))
      done = jnp.broadcast_to(step == n // p - 1, block.shape[:1])
      return (jnp.zeros(block.shape[:1], jnp.int32), fed[:, 0] if p == 1 else fed,
              (bits, rng), done)

    return step_fn, (jnp.zeros((batch_size, n, d), jnp.float32), jax.random.key(0)), n // p

  def generated_latents(self, state) -> jax.Array:
    return state[0]

  def render(self, params, frozen, outputs, state):
    """state's bits (b, D^2, d) in sequence order -> UniWeTok's image (b, S, S, 3)."""
    del params, outputs  # the outputs are placeholders; the bits are in the state
    bits, key = state
    side = self.image_slots.discrete_side
    grid = bits[:, np.argsort(self.cells)].reshape(bits.shape[0], side, side, -1)
    images = self.vq.apply(frozen['vq'], grid, method='decode', rngs={'noise': key})
    return jnp.clip(images, -1.0, 1.0)
