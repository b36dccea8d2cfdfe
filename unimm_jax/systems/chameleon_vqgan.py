"""Chameleon's VQGAN as a tokenizer of the tokenizer task: its spec pieces.

One code per latent cell from a codebook of config.model.n_embed; its loss term is the
quantizer's `embedding` (weighted by config.loss.embedding); no training-only modules.
`--mode=import` reads a transformers `chameleon_vqgan` or `chameleon` directory, or the
authors' VQModel state dict as one safetensors file (`unimm_jax.convert.chameleon_vqgan`).
"""
import logging

import ml_collections

from unimm_jax.convert import chameleon_vqgan as convert_vqgan
from unimm_jax.models import chameleon_vqgan
from unimm_jax.models.tokenizer_interface import CodeLayout, TrainingModule


def build(model_config: ml_collections.ConfigDict) -> chameleon_vqgan.ChameleonVQGAN:
  chameleon_vqgan.validate_model_config(model_config)
  return chameleon_vqgan.ChameleonVQGAN(model_config)


def downsample_factor(model_config: ml_collections.ConfigDict) -> int:
  return chameleon_vqgan.downsample_factor(model_config)


def code_layout(model_config: ml_collections.ConfigDict) -> CodeLayout:
  """One code per cell, n_embed codes."""
  return CodeLayout(codes_per_token=1, codebook_size=model_config.n_embed)


def training_modules(config: ml_collections.ConfigDict) -> list[TrainingModule]:
  del config
  return []


def import_weights(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """Variables ({'params'}) of `ChameleonVQGAN(model_config)` from a transformers directory or the authors'
  state dict file; an architecture that differs from config.model is named. A transformers
  directory has no decoder: it is initialised (and a warning says so)."""
  model, variables = convert_vqgan.load_vqgan(path, model_config)
  del model
  logging.info('imported the Chameleon VQGAN from %s', path)
  return variables
