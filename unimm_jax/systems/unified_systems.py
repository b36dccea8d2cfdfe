"""The table of unified systems: `config.system.name` -> its class (`mllm_interface`).

The MLLM task, its evaluator and the generation loop reach a system only through this table
and `UnifiedSystem`, so adding one is a system file, its models and a config file.
"""
import ml_collections

from unimm_jax.systems.bitdance_mllm import BitDanceMLLM
from unimm_jax.systems.evotok_mllm import EvoTokMLLM
from unimm_jax.systems.ming_univision import MingUniVision
from unimm_jax.systems.mllm_interface import UnifiedSystem
from unimm_jax.systems.unitoken import UniToken

SYSTEMS: dict[str, type] = {"unitoken": UniToken, "evotok": EvoTokMLLM,
                            "ming_univision": MingUniVision, "bitdance_mllm": BitDanceMLLM}


def build(config: ml_collections.ConfigDict) -> UnifiedSystem:
  """The system of config.system.name; an unknown name is an error listing the known ones."""
  name = config.system.name
  if name not in SYSTEMS:
    raise ValueError(f"config.system.name={name!r} is not one of {sorted(SYSTEMS)}")
  return SYSTEMS[name](config)
