"""The table of image tokenizers: `config.model.name` -> a `TokenizerSpec`.

The tokenizer task, `main` and inference reach a tokenizer only through its spec, so adding
one is a model file, a spec (in its system file) and a config file, with no branch on its
name anywhere else.
"""
import dataclasses
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models.tokenizer_interface import CodeLayout, TrainingModule
from unimm_jax.systems import chameleon_vqgan
from unimm_jax.systems import evotok
from unimm_jax.systems import mingtok
from unimm_jax.systems import uniwetok

ModelConfig = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """How to build and use one tokenizer.

  build: config.model -> the tokenizer module (`unimm_jax.models.tokenizer_interface`).
  downsample_factor: config.model -> pixels per latent cell along each side.
  code_layout: config.model -> CodeLayout, or None for a continuous tokenizer.
  training_modules: the whole config -> the training-only modules its loss switches on.
  import_weights: (path, config.model) -> variables ({'params': ..., plus state
    collections such as EMA codebooks}) from the authors' released weights, or None when
    there is no importer (`--mode=import`).
  trajectory_levels: config.model -> L for a residual tokenizer whose latents are sums of
    levels: `--mode=eval` then also evaluates the model's `at_depth(images, d)` (the
    reconstruction and features from the first d levels) for d = 1..L; 0 or None: none.
  initial_weights: config.model -> the pretrained sources a fresh run starts some params
    from (`unimm_jax.train.initial_weights`: a partial params tree of LazyArrays), from
    checkpoint paths in config.model, or None.
  normalized_latents: a continuous tokenizer whose latents are (z - config.model.latent_mean)
    / config.model.latent_scale, decode undoing it first: the two constants rescale the
    latents without changing what the tokenizer computes, so a unified system's config.vq
    may set them apart from its tokenizer run's (a generation head then works on unit-scale
    latents), and `--mode=eval` reports the constants that give the eval images' latents
    zero mean and unit std.
  """
  build: Callable[[ModelConfig], nn.Module]
  downsample_factor: Callable[[ModelConfig], int]
  code_layout: Callable[[ModelConfig], CodeLayout | None]
  training_modules: Callable[[ml_collections.ConfigDict], list[TrainingModule]]
  import_weights: Callable[[str, ModelConfig], Any] | None = None
  trajectory_levels: Callable[[ModelConfig], int] | None = None
  initial_weights: Callable[[ModelConfig], dict | None] | None = None
  normalized_latents: bool = False

  @property
  def latent_normalization_fields(self) -> tuple[str, ...]:
    return ("latent_mean", "latent_scale") if self.normalized_latents else ()


TOKENIZERS: dict[str, TokenizerSpec] = {
    "uniwetok": TokenizerSpec(build=uniwetok.build, downsample_factor=uniwetok.downsample_factor,
                              code_layout=uniwetok.code_layout,
                              training_modules=uniwetok.training_modules,
                              import_weights=uniwetok.import_weights),
    "chameleon_vqgan": TokenizerSpec(build=chameleon_vqgan.build,
                                     downsample_factor=chameleon_vqgan.downsample_factor,
                                     code_layout=chameleon_vqgan.code_layout,
                                     training_modules=chameleon_vqgan.training_modules,
                                     import_weights=chameleon_vqgan.import_weights),
    "evotok": TokenizerSpec(build=evotok.build, downsample_factor=evotok.downsample_factor,
                            code_layout=evotok.code_layout,
                            training_modules=evotok.training_modules,
                            import_weights=evotok.import_weights,
                            trajectory_levels=evotok.trajectory_levels,
                            initial_weights=evotok.initial_weights),
    "mingtok": TokenizerSpec(build=mingtok.build, downsample_factor=mingtok.downsample_factor,
                             code_layout=mingtok.code_layout,
                             training_modules=mingtok.training_modules,
                             import_weights=mingtok.import_weights, normalized_latents=True),
}


def spec(model_config: ModelConfig) -> TokenizerSpec:
  """The spec of config.model.name; an unknown name is an error listing the known ones."""
  if model_config.name not in TOKENIZERS:
    raise ValueError(f"config.model.name={model_config.name!r} is not one of "
                     f"{sorted(TOKENIZERS)}")
  return TOKENIZERS[model_config.name]


def init_variables(model: nn.Module, config: ml_collections.ConfigDict, rng) -> dict:
  """A tokenizer's variables (boxed with logical names) for config.data.image_size images:
  {'params': ..., plus its state collections (EMA codebooks)}; under `jax.eval_shape`, their
  shapes alone."""
  params_rng, noise_rng = jax.random.split(rng)
  size = config.data.image_size
  return dict(model.init({"params": params_rng, "noise": noise_rng},
                         jnp.zeros((1, size, size, 3), jnp.float32), train=False))


def init_params(model: nn.Module, config: ml_collections.ConfigDict, rng) -> Any:
  """The 'params' collection of `init_variables`."""
  return init_variables(model, config, rng)["params"]


def random_variables(model: nn.Module, model_config: ml_collections.ConfigDict,
                     image_size: int, rng) -> dict:
  """A random tokenizer's variables (unboxed) for `image_size` images: a unified system's
  frozen tokenizer when no path is given (tests of the plumbing), and under `jax.eval_shape`
  its shapes. Built outside any logical rules, which may be active in the caller's context
  and would constrain the fresh params to a mesh."""
  config = ml_collections.ConfigDict({"model": model_config.to_dict(),
                                      "data": {"image_size": image_size}})
  with nn.logical_axis_rules(()):
    return nn.unbox(init_variables(model, config, rng))


def random_frozen(init_fn: Callable, seed: int, what: str) -> Any:
  """`init_fn(key(seed))`, jitted, with a warning: a unified system's stand-in for the
  tokenizer `what` when config.system.tokenizer_path is empty."""
  logging.warning("config.system.tokenizer_path is empty: the %s is RANDOM (plumbing tests "
                  "only; images will not mean anything)", what)
  return jax.jit(init_fn)(jax.random.key(seed))
