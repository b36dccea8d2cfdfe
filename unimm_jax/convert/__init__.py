"""Weight import: `load_pretrained(path)` for HF checkpoints; the authors' own formats."""
from unimm_jax.convert.pretrained import load_pretrained, supported_model_types

__all__ = ['load_pretrained', 'supported_model_types']
