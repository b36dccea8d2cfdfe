"""The table of class-conditional image generators: `config.system.name` -> its class.

The class-to-image task (`unimm_jax.train.tasks.class_to_image`) reaches a generator only
through this table and the interface below, so adding one is a system file, its model and a
config file.

A generator is built from the whole config and offers:
  num_classes                      int; class id num_classes is the null (unconditional) class
  tokenizer_image_size() -> int    the image side S it generates
  init_params(rng) -> dict         trainable params (boxed with logical names)
  load_frozen() / frozen_shapes()  frozen networks (a pretrained tokenizer) and their shapes
  loss(params, frozen, images (b, S, S, 3), labels (b,), rng, *, train) -> (loss, metrics)
  sample(params, frozen, labels (b,), rng, *, cfg_scale, temperature) -> (b, S, S, 3)
"""
import ml_collections

from unimm_jax.systems.bitdance import BitDanceClassToImage

GENERATORS: dict[str, type] = {'bitdance': BitDanceClassToImage}


def build(config: ml_collections.ConfigDict):
  """The generator of config.system.name; an unknown name is an error listing the known
  ones."""
  name = config.system.name
  if name not in GENERATORS:
    raise ValueError(f'config.system.name={name!r} is not one of {sorted(GENERATORS)}')
  return GENERATORS[name](config)
