"""`load_pretrained(path)`: one entry for every HF checkpoint family this library imports.

A family converter is a function `convert(checkpoint, **overrides) -> Converted`: it reads
`checkpoint.config`, builds our Flax module, and describes each of our parameters as a
LazyArray over the checkpoint's tensors. This module checks the shapes, then places the
weights (optionally sharded over a mesh, built per device from its slice only).
"""
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from unimm_jax.convert import chameleon_vqgan
from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert import hf_llm
from unimm_jax.convert import hf_vit
from unimm_jax.convert.hf_checkpoint import Converted


Converter = Callable[..., Converted]


def _converters() -> dict[str, Converter]:
  return {**{model_type: hf_vit.convert for model_type in hf_vit.MODEL_TYPES},
          **{model_type: hf_llm.convert for model_type in hf_llm.MODEL_TYPES},
          # A full Chameleon: its LLM, and its VQ image tokenizer as part 'vqgan'.
          'chameleon': chameleon_vqgan.convert_chameleon,
          'chameleon_vqgan': chameleon_vqgan.convert}


class Pretrained(tuple):
  """`(model, variables)` of a checkpoint's main network, unpacked like a pair, plus:

  parts: the checkpoint's other networks by name, each a `(model, variables)` pair (a full
    Chameleon: `parts['vqgan']`, its image tokenizer, beside the LLM); empty for most.
  initialised: top-level parameter names the checkpoint lacked, initialised instead, those
    of a part prefixed with its name (a transformers `chameleon_vqgan`: `('decoder',)`; a full
    Chameleon: `('vqgan/decoder',)`).
  """
  parts: dict[str, tuple[nn.Module, dict]]
  initialised: tuple[str, ...]

  def __new__(cls, model: nn.Module, variables: dict, parts=None, initialised=()):
    self = super().__new__(cls, (model, variables))
    self.parts, self.initialised = dict(parts or {}), tuple(initialised)
    return self


def supported_model_types() -> list[str]:
  return sorted(_converters())


def convert_checkpoint(path: str, **overrides) -> Converted:
  """The checkpoint directory's networks as a `Converted`: our module and its parameters
  as LazyArrays over the checkpoint's tensors, read only when indexed (what
  `load_pretrained` places, and what a fresh run starts parts of its model from). Raises
  ValueError for an unknown `model_type` or a tensor the family does not use."""
  checkpoint = hf_checkpoint.HFCheckpoint(path)
  model_type = checkpoint.config.get('model_type')
  converters = _converters()
  if model_type not in converters:
    raise ValueError(f'{path}: config.json has model_type={model_type!r} '
                     f'(architectures {checkpoint.config.get("architectures")}); supported: '
                     f'{supported_model_types()}')
  return converters[model_type](checkpoint, **overrides)


# Fields of a module config that say how it runs, not what it computes: a checkpoint may
# differ in them from the model it starts.
RUN_FIELDS = ('dtype', 'param_dtype', 'scan_layers', 'remat', 'attention_impl', 'dropout_rate',
              'initializer_range', 'suppressed_token_ids', 'moe_dispatch')


def starting_sources(path: str, want: Any, *, where: str, ignore: Sequence[str] = (),
                     **overrides) -> dict:
  """The parameters of checkpoint `path` as LazyArrays, for a fresh run whose module has
  config `want` (a ViTConfig, an LLMConfig) to start from (`unimm_jax.train.initial_weights`).

  The checkpoint's architecture must be `want`'s in every field but RUN_FIELDS and `ignore`
  (a rope theta or a norm epsilon that differs would load without a shape error and compute
  something else); `where` names the config field that gave `path`. `overrides` go to the
  family converter (`scan_layers` as the model lays its layers out)."""
  converted = convert_checkpoint(path, **overrides)
  got = converted.model.config
  for field in dataclasses.fields(want):
    if field.name in RUN_FIELDS or field.name in ignore:
      continue
    a, b = getattr(got, field.name), getattr(want, field.name)
    if a != b:
      raise ValueError(f'{where}={path!r}: the checkpoint has {field.name}={a!r}, the model '
                       f'(config) {b!r}')
  return converted.sources


def load_pretrained(path: str, *, param_dtype: Any = jnp.float32, mesh: Mesh | None = None,
                    rules: Sequence | None = None, **overrides) -> Pretrained:
  """Imports a transformers checkpoint directory (config.json + safetensors).

  Args:
    path: directory written by `save_pretrained` or downloaded from the Hub, holding
      `model.safetensors` or `model.safetensors.index.json` with its shards.
    param_dtype: parameter dtype (bf16 halves a frozen teacher's memory).
    mesh, rules: place the parameters sharded by these logical-axis rules; each host reads
      only its devices' slices. Without a mesh the parameters land on the default device.
    **overrides: fields of the family's model config to change (e.g. `scan_layers=True`,
      `dtype=jnp.bfloat16` for compute).
  Returns:
    (model, variables): `model.apply(variables, inputs...)` with variables = {'params': ...},
    as a `Pretrained` pair whose `parts` hold the checkpoint's other networks (placed the
    same way) and `initialised` the parameters it lacked.
  Raises:
    ValueError for an unknown `model_type`, a missing or unexpected tensor, or a shape that
    differs from what config.json implies, naming the tensor.
  """
  converted = convert_checkpoint(path, **overrides)

  def placed(part: Converted) -> tuple[nn.Module, dict]:
    abstract = jax.eval_shape(lambda: part.model.init(jax.random.key(0), *part.example_inputs))
    params = hf_checkpoint.place(part.sources, abstract['params'], dtype=param_dtype,
                                 mesh=mesh, rules=rules)
    return part.model, {'params': params}

  return Pretrained(*placed(converted),
                    parts={name: placed(part) for name, part in converted.parts.items()},
                    initialised=converted.initialised + tuple(
                        f'{name}/{p}' for name, part in converted.parts.items()
                        for p in part.initialised))
