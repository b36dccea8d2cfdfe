r"""Writes builtin images (scikit-image's photos) as PNG files, e.g. to try --mode=encode.

  python -m unimm_jax.data.export_builtin --output=DIR [--names=eval] [--max_side=256]

--names takes what `config.data.builtin_names` takes (names or named sets such as
'photos' and 'faces_text'), or 'eval' for the held-out photos the train split never sees.
"""
import os

from absl import app
from absl import flags
from PIL import Image

from unimm_jax.data import builtin_images

_OUTPUT = flags.DEFINE_string("output", None, "Folder to write NAME.png files into.",
                              required=True)
_NAMES = flags.DEFINE_string("names", "eval", "Builtin names or sets, comma-separated; "
                             "'eval' = the held-out photos.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 0, "Resize (Lanczos) so the longer side is this "
                                 "many pixels, keeping the aspect ratio; 0 keeps the size.")


def main(argv):
  del argv
  names = (builtin_images.EVAL_NAMES if _NAMES.value == "eval"
           else builtin_images.expand_builtin_names(_NAMES.value))
  os.makedirs(_OUTPUT.value, exist_ok=True)
  for name in names:
    image = Image.fromarray(builtin_images.load_builtin(name))
    if _MAX_SIDE.value:
      scale = _MAX_SIDE.value / max(image.size)
      image = image.resize((round(image.width * scale), round(image.height * scale)),
                           Image.LANCZOS)
    image.save(os.path.join(_OUTPUT.value, f"{name}.png"))
  print(f"wrote {len(names)} images to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
