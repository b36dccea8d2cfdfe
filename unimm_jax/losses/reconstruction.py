"""Pixel reconstruction losses on images in [-1, 1], NHWC."""
import jax
import jax.numpy as jnp


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute error over every element; scalar float32."""
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error over every element; scalar float32."""
  return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
