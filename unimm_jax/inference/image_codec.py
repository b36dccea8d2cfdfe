"""A tokenizer's encode/decode as functions of its variables, and folders of images <-> .npz
codes (discrete tokenizers) or latents (continuous ones).

`reconstruct`, `encode` and `decode` take a tokenizer module (see
`unimm_jax.models.tokenizer_interface`) and return functions of (variables, array), where
variables = {'params': ..., plus any state collection such as EMA codebooks} as
`unimm_jax.convert.load_pretrained` and `TrainState.eval_variables` give them; the
decoder's noise (UniWeTok's generative decoder draws it on every call) comes from a fixed
key, so reconstructions and decoded images are the same in every run and on every host.

The .npz holds `names` (relative paths, str array) and `codes_00000`, `codes_00001`, ...
(one (h', w', codes_per_token) int array per image, in `names` order), plus `codebook_size`
and `codes_per_token`; for a continuous tokenizer `latents_00000`, ... ((h', w', d) float32,
what its `encode` returns: MingTok's normalised latents) plus `latent_dim`. Images keep their
native resolution, centre-cropped to a multiple of the downsampling factor.
"""
import logging
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unimm_jax.data import sources
from unimm_jax.inference import image_io
from unimm_jax.models.tokenizer_interface import CodeLayout

# Fixed key for the decoder's noise at evaluation and inference.
EVAL_NOISE_SEED = 1234


def _noise() -> dict:
  return {"noise": jax.random.key(EVAL_NOISE_SEED)}


def reconstruct(model: nn.Module) -> Callable:
  """(variables, images (b, h, w, 3)) -> reconstructions (b, h, w, 3) clipped to [-1, 1]."""
  def run(variables, images):
    out = model.apply(variables, images, train=False, rngs=_noise())
    return jnp.clip(out.recon, -1.0, 1.0)
  return run


def encode(model: nn.Module) -> Callable:
  """(variables, images (b, h, w, 3)) -> integer codes (b, h', w', codes_per_token), or a
  continuous tokenizer's latents (b, h', w', d)."""
  def run(variables, images):
    out = model.apply(variables, images, train=False, method="encode")
    return out.latents if out.codes is None else out.codes
  return run


def decode(model: nn.Module, continuous: bool = False) -> Callable:
  """(variables, codes (b, h', w', codes_per_token), or with `continuous` latents
  (b, h', w', d)) -> images (b, h, w, 3) in [-1, 1]."""
  def run(variables, tokens):
    def to_images(module, tokens):
      latents = tokens if continuous else module.codes_to_quantized(tokens)
      return module.decode(latents, train=False)
    return jnp.clip(model.apply(variables, tokens, method=to_images, rngs=_noise()),
                    -1.0, 1.0)
  return run


def load_centre_cropped(path: str, factor: int) -> np.ndarray:
  """(h, w, 3) float32 in [-1, 1], centre-cropped so h and w are multiples of `factor`."""
  with Image.open(path) as img:
    pixels = np.asarray(img.convert("RGB"), np.float32)
  h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
  if h == 0 or w == 0:
    raise ValueError(f"{path} ({pixels.shape[0]}x{pixels.shape[1]}) is smaller than the "
                     f"downsampling factor {factor}")
  return image_io.centre_crop(pixels, h, w) / 127.5 - 1.0


def encode_folder(encode_fn, input_dir: str, output_file: str, factor: int,
                  layout: CodeLayout | None) -> int:
  """Writes the codes (layout None: latents) of every image below `input_dir`; returns how
  many were encoded.

  encode_fn: (1, h, w, 3) -> (1, h', w', codes_per_token) codes or (1, h', w', d) latents;
  compiled once per distinct resolution. Unreadable files are skipped with a warning and
  left out of the .npz.
  """
  kind = "latents" if layout is None else "codes"
  names, arrays = [], {}
  try:
    names_in_folder = sources.list_image_files(input_dir, field="input")
  except ValueError as e:
    raise FileNotFoundError(str(e).replace("data_config.input", "--input")) from None
  for name in names_in_folder:
    try:
      image = load_centre_cropped(os.path.join(input_dir, name), factor)
    except (OSError, ValueError) as e:
      logging.warning("skipping %s: %s", name, e)
      continue
    tokens = np.asarray(jax.device_get(encode_fn(image[None])))[0]
    arrays[f"{kind}_{len(names):05d}"] = tokens
    names.append(name)
  os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
  if layout is None:
    meta = dict(latent_dim=tokens.shape[-1]) if names else {}
  else:
    meta = dict(codebook_size=layout.codebook_size, codes_per_token=layout.codes_per_token)
  np.savez_compressed(output_file, names=np.array(names), **meta, **arrays)
  return len(names)


def decode_file(decode_fn, input_file: str, output_dir: str, continuous: bool = False) -> int:
  """Writes one PNG per entry of a codes (`continuous`: latents) .npz, under its original
  relative name."""
  kind = "latents" if continuous else "codes"
  with np.load(input_file) as data:
    names = [str(n) for n in data["names"]]
    if names and f"{kind}_00000" not in data:
      other = "codes" if continuous else "latents"
      raise ValueError(f"{input_file} holds no {kind} (its arrays: {sorted(data)[:4]}); "
                       f"it was written for a tokenizer with {other}")
    for i, name in enumerate(names):
      image = np.asarray(jax.device_get(decode_fn(data[f"{kind}_{i:05d}"][None])))[0]
      path = os.path.join(output_dir, os.path.splitext(name)[0] + ".png")
      image_io.save_png(path, image_io.to_uint8(image))
  return len(names)
