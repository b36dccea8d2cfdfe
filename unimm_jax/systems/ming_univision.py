"""Ming-UniVision (../shared/papers/mingtok.txt sections 3-5; SPECS 4): one LLM that reads and
writes images in MingTok's semantic space.

Images enter the LLM the same way whether seen or generated, in the 'plain' layout of
`unimm_jax.data.mllm_sequence`: each of an image's h*w slots holds `projector`(the MingTok
semantic decoder's feature of its latent) (the authors' linear_proj: Linear-GELU-Linear,
semantic width -> LLM width). An image the user gives fills understanding slots; one the
assistant writes is [BOI] {h*w slots} [EOI], and the LLM's hidden state one position before
each slot conditions the per-token rectified-flow head (`models.flow_head`), trained on the
slot's normalised 32-d latent (loss `flow`). [BOI] and [EOI] are LM-head tokens; the latents
are not vocabulary ids (`codes_in_vocabulary` False).

Generation (`image_step`): after [BOI], each of the h*w steps samples a latent with the flow
head (16 Euler steps from noise, one draw shared by the streams) from the last hidden state
of every stream, guided by the two-scale CFG when there are several (conditional, then for
editing the text-unconditional stream that keeps the image context, then the unconditional
one; text scale = `cfg_scale`, image scale config.generation.image_scale), runs the semantic
decoder one token further with its own KV cache, and feeds projector(feature) to every
stream. The pixel decoder renders the latents at the end.

Editing keeps every image in context as latents (`embed` reads batch['image_latents'],
(b, P, h*w, d), in place of pixels): a generated image is never rendered and re-encoded
between rounds (`inference.mllm_inference.MLLMRunner.edit`).

Params: {'llm', 'projector', 'flow_head'}; frozen: {'vq': MingTok's variables} from
config.system.tokenizer_path (a MingTok tokenizer workdir or the authors' state dict); empty
= a random tokenizer (plumbing tests only). MingTok stays frozen in every stage here.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.data.mllm_sequence import ImageSlots
from unimm_jax.inference import generation_loop
from unimm_jax.models import flow_head
from unimm_jax.models import llm
from unimm_jax.models import mingtok
from unimm_jax.nn.mlp import Projector
from unimm_jax.systems import tokenizers
from unimm_jax.systems.mllm_interface import (Embedded, FrozenTokenizer, UnifiedSystem,
                                               shift_left, slot_predictors, take_slots)

# The flow loss's key when the task passes none (evaluation): fixed, so eval losses repeat.
_EVAL_NOISE_SEED = 4321


def flow_head_config(config: ml_collections.ConfigDict) -> flow_head.FlowHeadConfig:
  """config.flow_head on the LLM's width and the tokenizer's latent channels."""
  f = config.flow_head
  return flow_head.FlowHeadConfig(
      input_width=config.model.hidden_size, width=f.width, depth=f.depth,
      mlp_ratio=f.mlp_ratio, latent_dim=config.vq.latent_dim, t_distribution=f.t_distribution,
      t_mean=f.t_mean, t_std=f.t_std, dtype=f.dtype)


class MingUniVision(FrozenTokenizer, UnifiedSystem):
  """See the module docstring. Config: model (LLM), vq (a MingTok model config), system
  (name, tokenizer_path), flow_head, generation (image_scale, num_steps), tokens (pad,
  bos, eos, boi, eoi)."""
  codes_in_vocabulary = False
  tokenizer_name = 'MingTok'
  edits_in_context = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.vq.name != 'mingtok':
      raise ValueError(f'config.vq.name={config.vq.name!r}: this system reads a MingTok '
                       'tokenizer (its latents and semantic decoder)')
    self._build_llm_with_markers()
    self.vq = tokenizers.spec(config.vq).build(config.vq)
    side = config.vq.image_size // config.vq.encoder.patch_size
    self.image_slots = ImageSlots(image_size=config.vq.image_size, discrete_side=side,
                                  size_unit=config.vq.image_size, anyres=None, layout='plain')
    width = self.llm.config.hidden_size
    self.projector = Projector(width, width, dtype=self.llm.config.dtype)
    self.head = flow_head.FlowHead(flow_head_config(config))

  # ---- params ----------------------------------------------------------------------------

  def init_params(self, rng: jax.Array) -> dict:
    llm_rng, projector_rng, head_rng = jax.random.split(rng, 3)
    width, latent = self.llm.config.hidden_size, self.config.vq.latent_dim
    return {
        'llm': self.llm.init(llm_rng, jnp.zeros((1, 4), jnp.int32))['params'],
        'projector': self.projector.init(
            projector_rng, jnp.zeros((1, self.config.vq.semantic.width)))['params'],
        'flow_head': self.head.init(head_rng, jnp.zeros((1, latent)), jnp.zeros((1,)),
                                    jnp.zeros((1, width)))['params'],
    }

  # ---- sequences --------------------------------------------------------------------------

  def image_latents(self, frozen: dict, images: jax.Array) -> jax.Array:
    """images (b, P, H, W, 3) -> normalised latents (b, P, h*w, d), stop-gradient: the only
    place pixels enter."""
    b, p = images.shape[:2]
    out = self.vq.apply(frozen['vq'], images.reshape((b * p,) + images.shape[2:]),
                        method='encode')
    return jax.lax.stop_gradient(out.latents.reshape(b, p, -1, out.latents.shape[-1]))

  def image_inputs(self, params: dict, frozen: dict, latents: jax.Array) -> jax.Array:
    """Latents (b, P, n, d) -> the LLM inputs of their slots (b, P*n, width): the semantic
    decoder (causal within each image) then the projector."""
    b, p, n, d = latents.shape
    features = self.vq.apply(frozen['vq'], latents.reshape(b * p, n, d),
                             method='semantic_features')
    features = jax.lax.stop_gradient(features).reshape(b, p * n, -1)
    return self.projector.apply({'params': params['projector']}, features)

  def embed(self, params, frozen, batch, *, train, rng) -> Embedded:
    del train, rng  # no stochastic layers outside the LLM and the head
    tokens = batch['tokens']
    embeds = self.llm.apply({'params': params['llm']}, tokens, method=llm.LLM.embed)
    if 'image_latents' in batch:
      latents = batch['image_latents']
    elif batch['images'].shape[1]:
      latents = self.image_latents(frozen, batch['images'])
    else:
      return Embedded(embeds=embeds, tokens=tokens)
    inputs = self.image_inputs(params, frozen, latents).astype(embeds.dtype)
    for index in (batch['continuous_index'], batch['discrete_index']):
      embeds = jnp.where(index[..., None] >= 0, take_slots(inputs, index), embeds)
    flat = latents.reshape(latents.shape[0], -1, latents.shape[-1])
    return Embedded(embeds=embeds, tokens=tokens,
                    image_targets=take_slots(flat, batch['discrete_index']))

  def generation_losses(self, params, hidden, batch, embedded, rng, *, train):
    """{'flow'}: the flow head's velocity loss at the positions whose next slot is a
    generation slot (their hidden states condition its latent), mean over them. Those
    positions are gathered first (at most P h w per row), so the head runs on them only."""
    del train
    if embedded.image_targets is None:
      return {}
    images = batch['image_latents' if 'image_latents' in batch else 'images'].shape[1]
    order, valid = slot_predictors(batch, images * self.image_slots.codes_per_image)
    gather = lambda x: jax.vmap(lambda v, i: v[i])(x, order)
    targets = gather(shift_left(embedded.image_targets))
    rng = jax.random.key(_EVAL_NOISE_SEED) if rng is None else rng
    loss = self.head.apply({'params': params['flow_head']}, targets, gather(hidden), valid,
                           method=flow_head.FlowHead.loss, rngs={'noise': rng})
    return {'flow': loss}

  # ---- generation -------------------------------------------------------------------------

  def answer_step(self, params):
    allowed = np.ones(self.llm.config.vocab_size, bool)
    allowed[[self.ids.boi, self.ids.eoi, self.ids.pad]] = False
    return generation_loop.greedy_text_step(self.llm, params['llm'], jnp.asarray(allowed),
                                            self.ids.eos), ()

  def sample_latents(self, params, hidden: list, rng: jax.Array, *, cfg_scale: float,
                     temperature: float) -> jax.Array:
    """One latent per row from the streams' last hidden states (b, d) each (conditional
    first; two streams: + unconditional; three: + text-unconditional, + unconditional),
    one noise draw shared by them -> (b, latent_dim) float32."""
    g = self.config.generation
    noise = flow_head.initial_noise(rng, hidden[0].shape[0], self.config.vq.latent_dim,
                                    temperature)
    if len(hidden) == 1:
      return flow_head.sample(self.head, params['flow_head'], hidden[0], noise,
                              num_steps=g.num_steps)
    if len(hidden) > 3:
      raise ValueError(f'{len(hidden)} streams: Ming-UniVision guides with at most 3')
    return flow_head.sample_cfg(self.head, params['flow_head'], hidden[0],
                                hidden[1] if len(hidden) == 3 else None, hidden[-1], noise,
                                text_scale=cfg_scale, image_scale=g.image_scale,
                                num_steps=g.num_steps)

  def image_step(self, params, frozen, *, cfg_scale, temperature, top_k, top_p, batch_size):
    """State: (latents (b, n, d) so far, the semantic decoder's KV cache). top_k / top_p do
    not apply to a continuous head (refused when given)."""
    if top_k is not None or top_p is not None:
      raise ValueError('Ming-UniVision samples continuous latents: top_k / top_p do not apply')
    n, d = self.image_slots.codes_per_image, self.config.vq.latent_dim

    def step_fn(hidden, state, rng, step):
      latents, cache = state
      z = self.sample_latents(params, hidden, rng, cfg_scale=cfg_scale,
                              temperature=temperature)
      features, cache = self.vq.apply(frozen['vq'], z[:, None], cache,
                                      method='semantic_features')
      fed = self.projector.apply({'params': params['projector']}, features[:, 0])
      latents = jax.lax.dynamic_update_slice(latents, z[:, None], (0, step, 0))
      done = jnp.broadcast_to(step == n - 1, z.shape[:1])
      return (jnp.zeros(z.shape[:1], jnp.int32), fed.astype(self.llm.config.dtype),
              (latents, cache), done)

    state = (jnp.zeros((batch_size, n, d), jnp.float32),
             mingtok.init_semantic_cache(self.config.vq, batch_size, n))
    return step_fn, state, n

  def generated_latents(self, state) -> jax.Array:
    return state[0]

  def render(self, params, frozen, outputs, state):
    """state's latents (b, h*w, d) -> the pixel decoder's image (b, H, W, 3) in [-1, 1]."""
    del params, outputs  # the outputs are placeholders; the latents are in the state
    side = self.image_slots.discrete_side
    latents = state[0].reshape(state[0].shape[0], side, side, -1)
    return self.vq.apply(frozen['vq'], latents, method='decode')
