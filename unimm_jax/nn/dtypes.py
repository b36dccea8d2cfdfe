"""Compute dtypes named in configs."""
import jax.numpy as jnp

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str, key: str):
  """jnp dtype for a config string; `key` names the config field in the error."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'{key}={name!r} is not one of {sorted(COMPUTE_DTYPES)}')
  return COMPUTE_DTYPES[name]
