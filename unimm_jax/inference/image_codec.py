"""A tokenizer's encode/decode as functions of its variables, and folders of images <-> .npz
codes.

`reconstruct`, `encode` and `decode` take a tokenizer module (see
`unimm_jax.models.tokenizer_interface`) and return functions of (variables, array), where
variables = {'params': ..., plus any state collection such as EMA codebooks} as
`unimm_jax.convert.load_pretrained` and `TrainState.eval_variables` give them; the
decoder's noise (UniWeTok's generative decoder draws it on every call) comes from a fixed
key, so reconstructions and decoded images are the same in every run and on every host.

The .npz holds `names` (relative paths, str array) and `codes_00000`, `codes_00001`, ...
(one (h', w', codes_per_token) array per image, in `names` order), plus `codebook_size` and
`codes_per_token`. Images keep their native resolution, centre-cropped to a multiple of the
downsampling factor.
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
  """(variables, images (b, h, w, 3)) -> integer codes (b, h', w', codes_per_token)."""
  def run(variables, images):
    return model.apply(variables, images, train=False, method="encode").codes
  return run


def decode(model: nn.Module) -> Callable:
  """(variables, codes (b, h', w', codes_per_token)) -> images (b, h, w, 3) in [-1, 1]."""
  def run(variables, codes):
    def from_codes(module, codes):
      return module.decode(module.codes_to_quantized(codes), train=False)
    return jnp.clip(model.apply(variables, codes, method=from_codes, rngs=_noise()),
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
                  layout: CodeLayout) -> int:
  """Writes the codes of every image below `input_dir`; returns how many were encoded.

  encode_fn: (1, h, w, 3) -> (1, h', w', codes_per_token) codes; compiled once per distinct
  resolution. Unreadable files are skipped with a warning and left out of the .npz.
  """
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
    codes = np.asarray(jax.device_get(encode_fn(image[None])))[0]
    arrays[f"codes_{len(names):05d}"] = codes
    names.append(name)
  os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
  np.savez_compressed(output_file, names=np.array(names), codebook_size=layout.codebook_size,
                      codes_per_token=layout.codes_per_token, **arrays)
  return len(names)


def decode_file(decode_fn, input_file: str, output_dir: str) -> int:
  """Writes one PNG per entry of a codes .npz, under its original relative name."""
  with np.load(input_file) as data:
    names = [str(n) for n in data["names"]]
    for i, name in enumerate(names):
      image = np.asarray(jax.device_get(decode_fn(data[f"codes_{i:05d}"][None])))[0]
      path = os.path.join(output_dir, os.path.splitext(name)[0] + ".png")
      image_io.save_png(path, image_io.to_uint8(image))
  return len(names)
