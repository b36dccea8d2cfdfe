"""A trained tokenizer from its workdir, for notebooks and scripts, without a trainer.

  model, variables, config = load_tokenizer_run("workdir_demo")
  out = model.apply(variables, images, train=False, method="encode")   # latents, codes
  recon = image_codec.reconstruct(model)(variables, images)

`variables` is {'params': the EMA params (the params when the run kept no EMA), plus the
model's state collections (EMA codebooks) if it has any}, the same convention as
`unimm_jax.convert.load_pretrained`; nothing else of the checkpoint is read.
"""
import json

import jax
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.inference import restore
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel.context import MeshContext
from unimm_jax.systems import tokenizers


def load_tokenizer_run(workdir: str, context: MeshContext | None = None):
  """(model, variables, saved config) of `workdir`'s latest checkpoint.

  context: where to place the params; default every local device on the data axis with the
  run's rules (a run planned for a pod loads on a laptop).
  """
  config = restore.saved_config(workdir)
  if context is None:
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    context = MeshContext(mesh, config_defaults.sharding_rules(config))
  model = tokenizers.spec(config.model).build(config.model)
  boxed = jax.eval_shape(lambda rng: tokenizers.init_variables(model, config, rng),
                         jax.random.key(0))
  return model, restore.restore_eval_variables(workdir, boxed, context)[1], config


def load_matching_run(workdir: str, model_config: ml_collections.ConfigDict) -> dict:
  """The variables of `workdir`'s tokenizer, which must have been trained with
  `model_config` (a unified system's config.vq): a differing field is named. The latent
  normalisation constants (`TokenizerSpec.normalized_latents`) may differ."""
  _, variables, saved = load_tokenizer_run(workdir)
  # JSON form: a restored config holds lists where the config file wrote tuples.
  saved_fields, wanted = (json.loads(c.to_json()) for c in (saved.model, model_config))
  free = tokenizers.spec(model_config).latent_normalization_fields
  diff = sorted(k for k in set(saved_fields) | set(wanted)
                if saved_fields.get(k) != wanted.get(k) and k not in free)
  if diff:
    raise ValueError(f'the tokenizer run {workdir} has a different model config than '
                     f'config.vq (fields {diff})')
  return variables
