"""EvoTok's unified MLLM (../shared/papers/evotok.txt sec. 3.2-3.3; SPECS 2, MLLM part).

Images enter and leave the LLM through the frozen EvoTok tokenizer (config.vq), in the
'plain' layout of `unimm_jax.data.mllm_sequence` (LLaVA's):

  understanding  an image in a user turn is h*w slots, each the semantic decoder's feature
                 of f_sem (the sum of all L_sem levels) through `projector`
                 (Linear-GELU-Linear, LLaVA's mlp2x_gelu, out_width -> LLM width);
  generation     an image the assistant writes is [BOI] {h*w slots} [EOI]; slot s reads
                 `gen_projector`(f_pix,s) (the sum of its first L_pix code embeddings,
                 code_dim -> LLM width), and the LLM's hidden state one position earlier
                 feeds the depth transformer (`models.depth_transformer`), which predicts
                 the slot's L_pix codes one depth at a time. [BOI] and [EOI] are LM-head
                 tokens; the codes are not vocabulary ids (`codes_in_vocabulary` False).

Loss (the authors' `LlavaQwenForCausalLM.forward`): the task's text cross entropy (mean over
supervised text targets, code slots left out) + `image_ce`, the mean over every code target
and depth of the head's cross entropy (config.loss.image_ce, 1 as theirs).

Sampling (`image_step`): after the prompt's [BOI], each of the h*w steps runs the head on
the last hidden state of every stream; at every depth the logits are mixed by CFG
(uncond + s (cond - uncond); their code's default s = 3.0, the paper reports 7.5) and
sampled with temperature, top-k and top-p (theirs: 1.0, 900, 0.96); both streams read the
same sampled codes; the next LLM input is gen_projector(sum of the codes' embeddings).
The image is the tokenizer's pixel decoder on the sum of the generated codes' embeddings.
Their unconditional prompt is a user turn holding " "; here the shared loop's stream that
starts at [BOI] alone.

`config.system.mode` picks the model: 'understanding' (llm + projector), 'generation' (llm +
gen_projector + depth_head): the authors train these two separately; 'joint' (all three,
one model that answers and draws, as the built-in demo). A fresh run starts the LLM from
config.model.init_path (Qwen2.5-7B-Instruct at paper size) with the [BOI] and [EOI] rows of
its embedding and LM head set to the mean of the rows below them, as the authors initialise
the image markers they add to the vocabulary.

Params: {'llm', 'projector', 'gen_projector', 'depth_head'} (by mode); frozen: {'vq': the
tokenizer's variables} from config.system.tokenizer_path: an EvoTok tokenizer workdir or
the authors' state dict (.safetensors); empty = a random tokenizer (plumbing tests only).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unimm_jax.convert import hf_checkpoint
from unimm_jax.data.mllm_sequence import ImageSlots
from unimm_jax.inference import generation_loop
from unimm_jax.inference import sampling
from unimm_jax.models import llm
from unimm_jax.models.depth_transformer import DepthTransformer
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.mlp import Projector
from unimm_jax.systems import tokenizers
from unimm_jax.systems.mllm_interface import (Embedded, FrozenTokenizer, UnifiedSystem,
                                               shift_left, slot_predictors, take_slots)

MODES = ('understanding', 'generation', 'joint')


class EvoTokMLLM(FrozenTokenizer, UnifiedSystem):
  """See the module docstring. Config: model (LLM), vq (an EvoTok tokenizer's model config),
  system (name, mode, tokenizer_path), depth_head (width, num_heads, num_layers,
  dropout_rate), tokens (pad, bos, eos, boi, eoi)."""
  codes_in_vocabulary = False
  tokenizer_name = 'EvoTok tokenizer'

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.system.mode not in MODES:
      raise ValueError(f'config.system.mode={config.system.mode!r} is not one of {MODES}')
    if config.vq.name != 'evotok':
      raise ValueError(f'config.vq.name={config.vq.name!r}: this system reads an EvoTok '
                       'tokenizer (its semantic decoder and pixel codes)')
    self._build_llm_with_markers()
    self.understands = config.system.mode in ('understanding', 'joint')
    self.generates = config.system.mode in ('generation', 'joint')
    data = config.data
    for needed, weight in (('understanding', data.understanding_weight),
                           ('generation', data.generation_weight)):
      if weight and not (self.understands if needed == 'understanding' else self.generates):
        raise ValueError(f'config.data.{needed}_weight={weight}, but config.system.mode='
                         f'{config.system.mode!r} has no {needed} path')
    self.vq = tokenizers.spec(config.vq).build(config.vq)
    encoder = config.vq.encoder
    self.image_slots = ImageSlots(image_size=encoder.image_size,
                                  discrete_side=encoder.image_size // encoder.patch_size,
                                  size_unit=encoder.image_size, anyres=None, layout='plain')
    width, dtype = self.llm.config.hidden_size, self.llm.config.dtype
    self.projector = Projector(width, width, dtype=dtype)
    self.gen_projector = Projector(width, width, dtype=dtype)
    h = config.depth_head
    self.depth_head = DepthTransformer(
        depth=config.vq.pixel_depth, codebook_size=config.vq.codebook_size, width=h.width,
        num_heads=h.num_heads, num_layers=h.num_layers, dropout_rate=h.dropout_rate,
        dtype=compute_dtype(h.dtype, 'config.depth_head.dtype'))

  # ---- params ----------------------------------------------------------------------------

  def init_params(self, rng: jax.Array) -> dict:
    llm_rng, projector_rng, gen_rng, head_rng = jax.random.split(rng, 4)
    vq, width = self.config.vq, self.llm.config.hidden_size
    params = {'llm': self.llm.init(llm_rng, jnp.zeros((1, 4), jnp.int32))['params']}
    if self.understands:
      params['projector'] = self.projector.init(
          projector_rng, jnp.zeros((1, vq.semantic.out_width)))['params']
    if self.generates:
      params['gen_projector'] = self.gen_projector.init(
          gen_rng, jnp.zeros((1, vq.code_dim)))['params']
      params['depth_head'] = self.depth_head.init(
          head_rng, jnp.zeros((1, width)), jnp.zeros((1, vq.pixel_depth, vq.code_dim)))['params']
    return params

  def initial_weights(self) -> dict | None:
    """The LLM from config.model.init_path, the rows of [BOI] and [EOI] in its embedding and
    LM head set to the mean of the rows below the first of them (module docstring)."""
    sources = super().initial_weights()
    if not sources or not self.generates:
      return sources
    llm_sources = dict(sources['llm'])
    markers = (self.ids.boi, self.ids.eoi)
    llm_sources['embed_tokens'] = {'embedding': hf_checkpoint.RowsAsMean(
        llm_sources['embed_tokens']['embedding'], markers, axis=0, upto=min(markers))}
    if 'lm_head' in llm_sources:  # (hidden, vocab): the rows are columns
      llm_sources['lm_head'] = hf_checkpoint.RowsAsMean(llm_sources['lm_head'], markers,
                                                        axis=1, upto=min(markers))
    return {**sources, 'llm': llm_sources}

  # ---- sequences --------------------------------------------------------------------------

  def _encode(self, frozen: dict, images: jax.Array) -> dict:
    """images (b, P, H, W, 3) -> per image token, over the row's P images (n = P h w):
    codes (b, n, L_pix) int32, code_embeds (b, n, L_pix, d), f_pix (b, n, d) and, when the
    model understands, semantic (b, n, out_width); all stop-gradient."""
    b, p = images.shape[:2]
    flat = images.reshape((b * p,) + images.shape[2:])
    vq = lambda *args, **kw: self.vq.apply(frozen['vq'], *args, **kw)
    out = vq(flat, method='encode')
    lp = self.config.vq.pixel_depth
    codes = out.codes[..., :lp].reshape(b, -1, lp).astype(jnp.int32)
    result = {'codes': codes, 'code_embeds': vq(codes, method='pixel_code_embeddings'),
              'f_pix': out.latents.reshape(b, codes.shape[1], -1)}
    if self.understands:
      semantic = vq(out.features['semantic_latents'], method='decode_semantic')
      result['semantic'] = semantic.reshape(b, codes.shape[1], -1)
    return jax.tree.map(jax.lax.stop_gradient, result)

  def embed(self, params, frozen, batch, *, train, rng) -> Embedded:
    del train, rng  # no stochastic layers outside the LLM and the head
    tokens = batch['tokens']
    embeds = self.llm.apply({'params': params['llm']}, tokens, method=llm.LLM.embed)
    if not batch['images'].shape[1]:
      return Embedded(embeds=embeds, tokens=tokens)
    encoded = self._encode(frozen, batch['images'])
    targets = None
    if self.understands:
      continuous = batch['continuous_index']
      features = self.projector.apply({'params': params['projector']}, encoded['semantic'])
      features = take_slots(features, continuous).astype(embeds.dtype)
      embeds = jnp.where(continuous[..., None] >= 0, features, embeds)
    if self.generates:
      discrete = batch['discrete_index']
      inputs = self.gen_projector.apply({'params': params['gen_projector']}, encoded['f_pix'])
      inputs = take_slots(inputs, discrete).astype(embeds.dtype)
      embeds = jnp.where(discrete[..., None] >= 0, inputs, embeds)
      targets = {'codes': take_slots(encoded['codes'], discrete),
                 'code_embeds': take_slots(encoded['code_embeds'], discrete)}
    return Embedded(embeds=embeds, tokens=tokens, image_targets=targets)

  def generation_losses(self, params, hidden, batch, embedded, rng, *, train):
    """{'image_ce'}: the depth head's cross entropy at the positions whose next slot is a
    code slot (their hidden states predict its L_pix codes), mean over positions and
    depths. The positions are gathered first (at most P h w per row), so the head runs on
    image tokens only."""
    if not self.generates or embedded.image_targets is None:
      return {}
    order, valid = slot_predictors(batch,
                                   batch['images'].shape[1] * self.image_slots.codes_per_image)
    gather = lambda x: jax.vmap(lambda v, i: v[i])(x, order)
    targets = jax.tree.map(lambda x: gather(shift_left(x)), embedded.image_targets)
    rngs = {'dropout': rng} if train and rng is not None else {}
    logits = self.depth_head.apply({'params': params['depth_head']}, gather(hidden),
                                   targets['code_embeds'], deterministic=not rngs, rngs=rngs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets['codes'])
    count = jnp.maximum(jnp.sum(valid) * ce.shape[-1], 1.0)
    return {'image_ce': jnp.sum(ce * valid[..., None]) / count}

  # ---- generation -------------------------------------------------------------------------

  def answer_step(self, params):
    allowed = np.ones(self.llm.config.vocab_size, bool)
    allowed[[self.ids.boi, self.ids.eoi, self.ids.pad]] = False
    return generation_loop.greedy_text_step(self.llm, params['llm'], jnp.asarray(allowed),
                                            self.ids.eos), ()

  def sample_codes(self, params, frozen, hidden: list, rng: jax.Array, *, cfg_scale: float,
                   temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """The L_pix codes of one image token, depth by depth (module docstring).

    hidden: per stream (b, d) the LLM's last hidden states (conditional first).
    Returns (b, L_pix) int32.
    """
    lp, b = self.config.vq.pixel_depth, hidden[0].shape[0]
    codes = jnp.zeros((b, lp), jnp.int32)
    head = lambda h, sums: self.depth_head.apply({'params': params['depth_head']}, h, sums,
                                                 method=DepthTransformer.depth_logits)
    sums = jnp.zeros((b, 0, self.config.vq.code_dim), jnp.float32)
    for depth in range(lp):
      logits = [head(h, sums) for h in hidden]
      mixed = logits[0] if len(logits) == 1 else sampling.cfg_combine(logits[0], logits[1],
                                                                       cfg_scale)
      code = sampling.sample_logits(mixed, jax.random.fold_in(rng, depth), temperature, top_k,
                                    top_p)
      codes = codes.at[:, depth].set(code)
      embeds = self.vq.apply(frozen['vq'], codes, method='pixel_code_embeddings')
      sums = jnp.cumsum(embeds[:, :depth + 1], axis=1)
    return codes

  def image_step(self, params, frozen, *, cfg_scale, temperature, top_k, top_p, batch_size):
    n, lp = self.image_slots.codes_per_image, self.config.vq.pixel_depth

    def step_fn(hidden, state, rng, step):
      codes = self.sample_codes(params, frozen, hidden, rng, cfg_scale=cfg_scale,
                                temperature=temperature, top_k=top_k, top_p=top_p)
      embeds = self.vq.apply(frozen['vq'], codes, method='pixel_code_embeddings')
      fed = self.gen_projector.apply({'params': params['gen_projector']}, embeds.sum(axis=1))
      state = jax.lax.dynamic_update_slice(state, codes[:, None], (0, step, 0))
      done = jnp.broadcast_to(step == n - 1, codes.shape[:1])
      return codes[:, 0], fed.astype(self.llm.config.dtype), state, done

    return step_fn, jnp.zeros((batch_size, n, lp), jnp.int32), n

  def render(self, params, frozen, outputs, state):
    """state (b, h*w, L_pix) codes -> the pixel decoder's image (b, H, W, 3) in [-1, 1]."""
    del params, outputs  # outputs hold only each token's first code
    side = self.image_slots.discrete_side
    codes = state.reshape(state.shape[0], side, side, -1)
    f_pix = self.vq.apply(frozen['vq'], codes, method='codes_to_quantized')
    return jnp.clip(self.vq.apply(frozen['vq'], f_pix, method='decode'), -1.0, 1.0)
