r"""Side-by-side picture and PSNR of originals and their decoded reconstructions.

  python -m unimm_jax.inference.compare_folders --originals=DIR --decoded=DIR --output=x.png

Pairs files by relative name (`--mode=decode` keeps the names); each original is
centre-cropped to its reconstruction's size (encoding crops to a multiple of the
downsampling factor). The picture has the originals on top, the reconstructions below.
"""
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from unimm_jax.evals import image_metrics
from unimm_jax.inference import image_io

_ORIGINALS = flags.DEFINE_string("originals", None, "Folder of original images.", required=True)
_DECODED = flags.DEFINE_string("decoded", None, "Folder written by --mode=decode.",
                               required=True)
_OUTPUT = flags.DEFINE_string("output", None, "PNG to write.", required=True)


def _load(path: str) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1.0


def side_by_side(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
  """[(original, recon)] of any sizes -> one uint8 picture, originals above recons."""
  h = max(r.shape[0] for _, r in pairs)
  width = sum(r.shape[1] + 4 for _, r in pairs)
  grid = np.full((2 * h + 4, width, 3), 255, np.uint8)
  x = 0
  for original, recon in pairs:
    rh, rw = recon.shape[:2]
    grid[:rh, x:x + rw] = image_io.to_uint8(original)
    grid[h + 4:h + 4 + rh, x:x + rw] = image_io.to_uint8(recon)
    x += rw + 4
  return grid


def main(argv):
  del argv
  pairs = []
  for name in sorted(os.listdir(_DECODED.value)):
    recon = _load(os.path.join(_DECODED.value, name))
    original = image_io.centre_crop(_load(os.path.join(_ORIGINALS.value, name)), *recon.shape[:2])
    psnr = float(image_metrics.psnr(original[None], recon[None], data_range=2.0)[0])
    print(f"{name}: {recon.shape[1]}x{recon.shape[0]} PSNR {psnr:.2f} dB")
    pairs.append((original, recon))
  image_io.save_png(_OUTPUT.value, side_by_side(pairs))
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
