"""Folder of images <-> .npz of integer codes, with a trained tokenizer's EMA params.

The .npz holds `names` (relative paths, str array) and `codes_00000`, `codes_00001`, ...
(one (h', w', g) array per image, in `names` order), plus `group_bits`. Images keep their
native resolution, centre-cropped to a multiple of the downsampling factor.
"""
import logging
import os

import jax
import numpy as np
from PIL import Image

from unimm_jax.data import sources
from unimm_jax.inference import image_io

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
                  group_bits: int) -> int:
  """Writes the codes of every image below `input_dir`; returns how many were encoded.

  encode_fn: (1, h, w, 3) -> (1, h', w', g) codes; compiled once per distinct resolution.
  Unreadable files are skipped with a warning and left out of the .npz.
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
  np.savez_compressed(output_file, names=np.array(names), group_bits=group_bits, **arrays)
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
