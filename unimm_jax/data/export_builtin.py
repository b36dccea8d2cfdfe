r"""Writes builtin images (scikit-image's photos) as PNG files, e.g. to try --mode=encode.

  python -m unimm_jax.data.export_builtin --output=DIR [--names=eval]

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


def main(argv):
  del argv
  names = (builtin_images.EVAL_NAMES if _NAMES.value == "eval"
           else builtin_images.expand_builtin_names(_NAMES.value))
  os.makedirs(_OUTPUT.value, exist_ok=True)
  for name in names:
    Image.fromarray(builtin_images.load_builtin(name)).save(
        os.path.join(_OUTPUT.value, f"{name}.png"))
  print(f"wrote {len(names)} images to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
