"""BitDance's flow objective for binary latents, as pure functions (SPECS section 1).

Facts from the authors' code (BitDance imagenet_gen/src/diff_head.py and
modeling/vision_head/flow_head_parallel_x.py, `DiffHead.forward`):
- t = sigmoid(mean + std * N(0, 1)) (logit-normal), mean -0.8 and std 0.8 in their runs;
  one t per predicted token;
- z_t = (1 - t) * eps + t * x with eps ~ N(0, I): t = 0 is pure noise, t = 1 the data;
- the network predicts x (bounded to [-1, 1] by 2 * sigmoid - 1 in the head) and both the
  target and the prediction are turned into velocities v = (x - z_t) / max(1 - t, 0.05);
- loss = mean squared error between the two velocities, over every element.

Since v_pred - v = (x_pred - x) / max(1 - t, 0.05), this is an x-prediction MSE weighted by
1 / max(1 - t, 0.05)^2: clean-end timesteps count up to 400 times more than noisy ones.
"""
import jax
import jax.numpy as jnp

P_MEAN = -0.8
P_STD = 0.8
MIN_DENOMINATOR = 0.05


def sample_logit_normal_t(rng: jax.Array, shape: tuple[int, ...], mean: float = P_MEAN,
                          std: float = P_STD) -> jax.Array:
  """Timesteps t = sigmoid(mean + std * n), n ~ N(0, 1). Returns `shape` float32 in (0, 1)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))


def flow_interpolate(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """z_t = (1 - t) * eps + t * x.

  Shapes: x and eps (..., d); t broadcastable to x, e.g. (..., 1) for one t per token.
  """
  return (1.0 - t) * eps + t * x


def velocity(x: jax.Array, z_t: jax.Array, t: jax.Array,
             min_denominator: float = MIN_DENOMINATOR) -> jax.Array:
  """v = (x - z_t) / max(1 - t, min_denominator), the velocity implied by an x estimate.

  The clamp keeps v finite as t -> 1, where the exact (x - z_t) / (1 - t) is 0 / 0.
  Shapes: x and z_t (..., d); t broadcastable to x. Returns (..., d).
  """
  return (x - z_t) / jnp.maximum(1.0 - t, min_denominator)


def x_prediction_velocity_loss(pred_x: jax.Array, x: jax.Array, z_t: jax.Array,
                               t: jax.Array) -> jax.Array:
  """Mean over all elements of (velocity(pred_x) - velocity(x))^2, a float32 scalar.

  Args:
    pred_x: (..., d) the network's estimate of x (already mapped by 2 * sigmoid - 1).
    x: (..., d) the clean target.
    z_t: (..., d) the noisy input the network saw, `flow_interpolate(x, eps, t)`.
    t: timesteps broadcastable to x, e.g. (..., 1).
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  pred_x, x, z_t, t = f32(pred_x), f32(x), f32(z_t), f32(t)
  return jnp.mean(jnp.square(velocity(pred_x, z_t, t) - velocity(x, z_t, t)))
