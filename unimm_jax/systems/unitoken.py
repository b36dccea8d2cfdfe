"""UniToken: discrete VQ codes and continuous any-res SigLIP features of one image, side by
side in one Chameleon-style LLM sequence (paper: ../shared/papers/unitoken.txt; SPECS 3).

  [BOS] ... [BOI][h][w] {rows of VQ codes, each + [EOR]} [SEP] {ViT features} [EOI] ...

Understanding reads both: the codes enter through the LLM's own embedding table (image code
c is vocabulary id `tokens.image_offset + c`), the ViT features through an adapter
Linear -> GELU -> Linear (1152 -> 4096 -> 4096 at paper size) into continuous slots laid
out by LLaVA-NeXT any-res (`unimm_jax.data.anyres`: base tile first, then the unpadded
tile grid with the [EOR] token's embedding after every row). Generation is plain next-token
prediction of [h][w], the code rows with their [EOR]s and [EOI] by the LM head, so the MLLM
task's cross entropy is the whole generation loss; a grammar fixes the size tokens, allows
only image codes inside rows, [EOR] after every row and [EOI] after the last, and CFG mixes
the logits of an unconditional stream that starts at [BOI] (its own KV cache). Codes are
rendered by the frozen VQGAN's decoder.

Params: {'llm', 'vit', 'adapter'} ({'llm'} alone with config.system.continuous False); a
fresh run starts the LLM from config.model.init_path and the ViT from config.vit.init_path
when they are set (transformers `chameleon` and `siglip` directories);
frozen: {'vq'} from config.system.tokenizer_path: a tokenizer workdir trained with
configs/chameleon_vqgan.py, the authors' VQGAN state dict (.safetensors), or a transformers
`chameleon_vqgan` / `chameleon` directory (no decoder there: config.system.
tokenizer_decoder_path); empty = a random VQ, for tests of the plumbing only.
"""
import logging
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.convert import chameleon_vqgan as chameleon_vqgan_weights
from unimm_jax.convert import pretrained
from unimm_jax.data.anyres import AnyRes
from unimm_jax.data.mllm_sequence import ImageSlots, SpecialIds
from unimm_jax.inference import generation_loop
from unimm_jax.inference import sampling
from unimm_jax.inference import tokenizer_run
from unimm_jax.models import llm
from unimm_jax.models import vit
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.mlp import Projector
from unimm_jax.systems import tokenizers
from unimm_jax.systems.mllm_interface import Embedded, UnifiedSystem, take_slots


def _vit_config(fields: ml_collections.ConfigDict) -> vit.ViTConfig:
  return vit.ViTConfig(family='siglip', hidden_size=fields.hidden_size,
                       num_layers=fields.num_layers, num_heads=fields.num_heads,
                       mlp_dim=fields.mlp_dim, patch_size=fields.patch_size,
                       image_size=fields.image_size, use_head=False,
                       dtype=compute_dtype(fields.dtype, 'config.vit.dtype'),
                       scan_layers=fields.scan_layers, remat=fields.remat)


def _check_same_shapes(params, expected, where: str) -> None:
  """Raises ValueError naming the first parameter of `params` that `expected` lacks, has
  not, or shapes differently."""
  got = flax.traverse_util.flatten_dict(params, sep='/')
  want = flax.traverse_util.flatten_dict(expected, sep='/')
  for name in sorted(set(got) ^ set(want)):
    raise ValueError(f'{where}: parameter {name} is only in '
                     f'{"the file" if name in got else "config.vq"}')
  for name, value in got.items():
    if tuple(value.shape) != tuple(want[name].shape):
      raise ValueError(f'{where}: parameter {name} has shape {tuple(value.shape)}, config.vq '
                       f'expects {tuple(want[name].shape)}')


class UniToken(UnifiedSystem):
  """See the module docstring. Config: model (LLM), vit, adapter_hidden, vq (a tokenizer's
  model config), system (tokenizer_path, image_size, size_unit, grid_pinpoints), tokens."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    t = config.tokens
    self.ids = SpecialIds(pad=t.pad, bos=t.bos, eos=t.eos, boi=t.boi, eoi=t.eoi, sep=t.sep,
                          eor=t.eor, size_base=t.size_base, image_offset=t.image_offset,
                          num_image_codes=t.num_image_codes)
    self.llm = llm.LLM(llm.config_from_fields(config.model))
    self.vq_spec = tokenizers.spec(config.vq)
    self.vq = self.vq_spec.build(config.vq)
    codebook = self.vq_spec.code_layout(config.vq).codebook_size
    if codebook != t.num_image_codes:
      raise ValueError(f'config.tokens.num_image_codes={t.num_image_codes} differs from the '
                       f'VQ codebook size {codebook}')
    top = max(t.image_offset + t.num_image_codes - 1, t.boi, t.eoi, t.sep, t.eor, t.eos,
              t.size_base + config.system.image_size // config.system.size_unit)
    if top >= self.llm.config.vocab_size:
      raise ValueError(f'config.model.vocab_size={self.llm.config.vocab_size} cannot hold '
                       f'the image and special ids (largest {top}, config.tokens)')
    self.vit_config = _vit_config(config.vit)
    self.vision = vit.VisionTransformer(self.vit_config)
    self.adapter = Projector(config.adapter_hidden, self.llm.config.hidden_size,
                           dtype=self.llm.config.dtype)
    side = config.system.image_size // self.vq_spec.downsample_factor(config.vq)
    anyres = None
    if config.system.continuous:  # else Chameleon's discrete-only encoding (Table 5)
      pinpoints = tuple(tuple(int(v) for v in p) for p in config.system.grid_pinpoints)
      anyres = AnyRes(tile_size=self.vit_config.image_size,
                      tokens_per_side=self.vit_config.image_size // self.vit_config.patch_size,
                      grid_pinpoints=pinpoints)
    self.image_slots = ImageSlots(image_size=config.system.image_size, discrete_side=side,
                                  size_unit=config.system.size_unit, anyres=anyres)

  # ---- params ----------------------------------------------------------------------------

  def init_params(self, rng: jax.Array) -> dict:
    llm_rng, vit_rng, adapter_rng = jax.random.split(rng, 3)
    params = {'llm': self.llm.init(llm_rng, jnp.zeros((1, 4), jnp.int32))['params']}
    if self.image_slots.anyres is not None:
      tile = jnp.zeros((1, self.vit_config.image_size, self.vit_config.image_size, 3))
      params['vit'] = self.vision.init(vit_rng, tile)['params']
      params['adapter'] = self.adapter.init(
          adapter_rng, jnp.zeros((1, self.vit_config.hidden_size)))['params']
    return params

  def initial_weights(self) -> dict | None:
    """The LLM from config.model.init_path (a transformers `chameleon` directory) and the
    ViT from config.vit.init_path (a `siglip` one: SigLIP-SO400M-14-384 at paper size, its
    pooling head unused); either may be empty."""
    sources = dict(super().initial_weights() or {})
    path = self.config.vit.get('init_path', '')
    if path and self.image_slots.anyres is not None:
      vit_sources = pretrained.starting_sources(
          path, self.vit_config, where='config.vit.init_path', ignore=('use_head',),
          scan_layers=self.vit_config.scan_layers)
      sources['vit'] = {k: v for k, v in vit_sources.items() if k != 'head'}
    return sources or None

  def _init_vq(self, rng: jax.Array):
    """A random VQ's params (unboxed)."""
    return tokenizers.random_variables(self.vq, self.config.vq, self.config.system.image_size,
                                       rng)['params']

  def frozen_shapes(self) -> dict:
    return {'vq': jax.eval_shape(self._init_vq, jax.random.key(0))}

  def load_frozen(self) -> dict:
    path = self.config.system.tokenizer_path
    if not path:
      params = tokenizers.random_frozen(self._init_vq, self.config.seed, 'VQ tokenizer')
    elif path.endswith('.safetensors') or os.path.exists(os.path.join(path, 'config.json')):
      # The authors' state dict, or a transformers chameleon_vqgan / chameleon directory
      # (which holds no decoder: config.system.tokenizer_decoder_path supplies it).
      decoder = self.config.system.tokenizer_decoder_path or None
      _, variables = chameleon_vqgan_weights.load_vqgan(path, self.config.vq,
                                                        decoder_path=decoder)
      if decoder is None and not path.endswith('.safetensors'):
        logging.warning('%s has no VQ decoder and config.system.tokenizer_decoder_path is '
                        'empty: generated images are decoded by a RANDOM decoder', path)
      params = variables['params']
    else:
      params = tokenizer_run.load_matching_run(path, self.config.vq)['params']
    _check_same_shapes(params, self.frozen_shapes()['vq'], path)
    return {'vq': jax.tree.map(np.asarray, params)}

  # ---- sequences --------------------------------------------------------------------------

  def _codes(self, frozen: dict, images: jax.Array) -> jax.Array:
    """images (b, P, H, W, 3) -> (b, P * h' * w') int32 codes, row-major per image."""
    b, p = images.shape[:2]
    flat = images.reshape((b * p,) + images.shape[2:])
    out = self.vq.apply({'params': frozen['vq']}, flat, method='encode')
    return jax.lax.stop_gradient(out['image_tokens']).reshape(b, -1)

  def _features(self, params: dict, tiles: jax.Array) -> jax.Array:
    """tiles (b, P, 1 + max_tiles, S, S, 3) -> (b, P * F, d) adapted ViT features."""
    b = tiles.shape[0]
    flat = tiles.reshape((-1,) + tiles.shape[3:])
    hidden = self.vision.apply({'params': params['vit']}, flat)['last_hidden_state']
    adapted = self.adapter.apply({'params': params['adapter']}, hidden)
    return adapted.reshape(b, -1, adapted.shape[-1])

  def embed(self, params, frozen, batch, *, train, rng) -> Embedded:
    del train, rng  # no stochastic layers outside the LLM
    tokens, discrete = batch['tokens'], batch['discrete_index']
    if batch['images'].shape[1]:
      codes = take_slots(self._codes(frozen, batch['images']), discrete)
      tokens = jnp.where(discrete >= 0, self.ids.image_offset + codes, tokens)
    embeds = self.llm.apply({'params': params['llm']}, tokens, method=llm.LLM.embed)
    if self.image_slots.anyres is not None and batch['vit_tiles'].shape[1]:
      continuous = batch['continuous_index']
      features = take_slots(self._features(params, batch['vit_tiles']), continuous)
      embeds = jnp.where(continuous[..., None] >= 0, features.astype(embeds.dtype), embeds)
    return Embedded(embeds=embeds, tokens=tokens)

  # ---- generation -------------------------------------------------------------------------

  def _text_mask(self) -> np.ndarray:
    """(vocab,) True for ids an answer may use: not image codes, BOI/EOI/SEP or sizes."""
    ok = np.ones(self.llm.config.vocab_size, bool)
    ids = self.ids
    ok[ids.image_offset:ids.image_offset + ids.num_image_codes] = False
    ok[[ids.boi, ids.eoi, ids.sep, ids.pad]] = False
    ok[ids.size_base:ids.size_base + 1 + self.image_slots.image_size // self.image_slots.size_unit] = False
    return ok

  def answer_step(self, params):
    return generation_loop.greedy_text_step(self.llm, params['llm'],
                                            jnp.asarray(self._text_mask()), self.ids.eos), ()

  def _grammar(self) -> np.ndarray:
    """(n, vocab) bool: the ids allowed at each output after [BOI]:
    [h] [w] {side x (side codes, [EOR])} [EOI]."""
    ids, slots = self.ids, self.image_slots
    side, units = slots.discrete_side, slots.image_size // slots.size_unit
    n = 2 + side * (side + 1) + 1
    allowed = np.zeros((n, self.llm.config.vocab_size), bool)
    allowed[0, ids.size_base + units] = allowed[1, ids.size_base + units] = True
    for row in range(side):
      start = 2 + row * (side + 1)
      allowed[start:start + side, ids.image_offset:ids.image_offset + ids.num_image_codes] = True
      allowed[start + side, ids.eor] = True
    allowed[n - 1, ids.eoi] = True
    return allowed

  def image_step(self, params, frozen, *, cfg_scale, temperature, top_k, top_p, batch_size):
    del frozen, batch_size  # codes are vocabulary ids: the LM head and its embedding suffice
    grammar = jnp.asarray(self._grammar())

    def step_fn(hidden, state, rng, step):
      logits = [generation_loop.logits(self.llm, params['llm'], h) for h in hidden]
      mixed = logits[0] if len(logits) == 1 else sampling.cfg_combine(logits[0], logits[1],
                                                                       cfg_scale)
      mixed = jnp.where(grammar[step], mixed, -jnp.inf)
      token = sampling.sample_logits(mixed, rng, temperature, top_k, top_p)
      embeds = generation_loop.embed_ids(self.llm, params['llm'], token[:, None])[:, 0]
      return token, embeds, state, jnp.broadcast_to(step == grammar.shape[0] - 1, token.shape)

    return step_fn, (), grammar.shape[0]

  def render(self, params, frozen, outputs, state):
    del params, state
    side = self.image_slots.discrete_side
    rows = outputs[:, 2:2 + side * (side + 1)].reshape(-1, side, side + 1)[:, :, :side]
    codes = jnp.clip(rows - self.ids.image_offset, 0, self.ids.num_image_codes - 1)
    return self.vq.apply({'params': frozen['vq']}, codes, method='decode_codes')
