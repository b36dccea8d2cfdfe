"""BitDance class-to-image on UniWeTok's binary codes (UniWeTok paper Table 9; SPECS 1).

A frozen UniWeTok turns images (b, S, S, 3) into (b, S/f, S/f, g d') tokens of +-1 bits; the
`models.bitdance.BitDance` generator learns them class-conditionally with its binary
diffusion head; generated bits go back through UniWeTok's decoder. The authors' released
ImageNet generators read their own autoencoder (ae_d16c32), not UniWeTok; Table 9 trains
the generator on UniWeTok's codes, which is what this system does.

Params: {'generator'}; frozen: {'vq': UniWeTok's variables} from config.system.tokenizer_path
(a UniWeTok workdir or the authors' .safetensors; empty = random, plumbing tests only).
Config: model (BitDanceConfig fields but the three the data and tokenizer fix), vq (a
UniWeTok model config), system (name, tokenizer_path), generation (num_steps, cfg_scale,
cfg_schedule), data.image_size.
"""
import ml_collections
import jax
import jax.numpy as jnp

from unimm_jax.models import bitdance
from unimm_jax.systems import tokenizers
from unimm_jax.systems.mllm_interface import FrozenTokenizer

def generator_config(config: ml_collections.ConfigDict) -> bitdance.BitDanceConfig:
  """config.model on the tokenizer's bits per token and token grid at data.image_size."""
  vq = config.vq
  factor = tokenizers.spec(vq).downsample_factor(vq)
  size = config.data.image_size
  if size % factor:
    raise ValueError(f'config.data.image_size={size} is not a multiple of the tokenizer\'s '
                     f'downsampling factor {factor}')
  fields = config.model.to_dict()
  fields['grid'] = (size // factor, size // factor)
  return bitdance.BitDanceConfig(latent_dim=vq.groups * vq.group_bits, **fields)


class BitDanceClassToImage(FrozenTokenizer):
  """See the module docstring; the interface of `systems.class_generators`."""
  tokenizer_name = 'UniWeTok'

  def __init__(self, config: ml_collections.ConfigDict):
    if config.vq.name != 'uniwetok':
      raise ValueError(f'config.vq.name={config.vq.name!r}: BitDance generates the binary '
                       'codes of a UniWeTok tokenizer')
    self.config = config
    self.vq = tokenizers.spec(config.vq).build(config.vq)
    self.generator = bitdance.BitDance(generator_config(config))
    self.num_classes = self.generator.config.num_classes

  def tokenizer_image_size(self) -> int:
    return self.config.data.image_size

  def init_params(self, rng: jax.Array) -> dict:
    cfg = self.generator.config
    bits = jnp.ones((1, *cfg.grid, cfg.latent_dim), jnp.float32)
    init_rngs = dict(zip(('params', 'noise'), jax.random.split(rng)))
    return {'generator': self.generator.init(init_rngs, bits, jnp.zeros((1,), jnp.int32),
                                             train=False)['params']}

  def bits(self, frozen: dict, images: jax.Array) -> jax.Array:
    """images (b, S, S, 3) in [-1, 1] -> UniWeTok's tokens (b, S/f, S/f, g d') in {-1, +1}."""
    latents = self.vq.apply(frozen['vq'], images, method='encode').latents
    return jax.lax.stop_gradient(latents)

  def loss(self, params: dict, frozen: dict, images: jax.Array, labels: jax.Array,
           rng: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The generator's loss on the images' tokens: (float32 scalar, metrics)."""
    return self.generator.apply({'params': params['generator']}, self.bits(frozen, images),
                                labels, train=train, rngs={'noise': rng})

  def sample(self, params: dict, frozen: dict, labels: jax.Array, rng: jax.Array, *,
             cfg_scale: float, temperature: float = 1.0) -> jax.Array:
    """labels (b,) -> images (b, S, S, 3) in [-1, 1] (config.generation: num_steps and
    cfg_schedule)."""
    g = self.config.generation
    sample_key, decode_key = jax.random.split(rng)
    bits = bitdance.sample(self.generator, params['generator'], labels, sample_key,
                           num_steps=g.num_steps, cfg_scale=cfg_scale,
                           cfg_schedule=g.cfg_schedule, temperature=temperature)
    # UniWeTok's decoder reads a noise map beside the tokens (its generative decoder).
    images = self.vq.apply(frozen['vq'], bits, method='decode', rngs={'noise': decode_key})
    return jnp.clip(images, -1.0, 1.0)
