"""Maps `config.model.name` to a tokenizer module."""
import flax.linen as nn
import ml_collections

from unimm_jax.models import uniwetok

_TOKENIZERS = {"uniwetok": uniwetok.UniWeTok}
_DOWNSAMPLE_FACTORS = {"uniwetok": uniwetok.downsample_factor}


def build_tokenizer(model_config: ml_collections.ConfigDict) -> nn.Module:
  if model_config.name not in _TOKENIZERS:
    raise ValueError(f"config.model.name={model_config.name!r} is not one of "
                     f"{sorted(_TOKENIZERS)}")
  return _TOKENIZERS[model_config.name](model_config)


def downsample_factor(model_config: ml_collections.ConfigDict) -> int:
  """Pixels per token side of `config.model`'s tokenizer."""
  return _DOWNSAMPLE_FACTORS[model_config.name](model_config)
