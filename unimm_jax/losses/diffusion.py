"""Flow objectives for per-token heads, as pure functions (SPECS sections 1 and 4).

Two conventions live here, one per head; they differ in which end of t is the noise.

BitDance (x-prediction on binary latents; SPECS section 1). Facts from the authors' code
(BitDance imagenet_gen/src/diff_head.py and modeling/vision_head/flow_head_parallel_x.py,
`DiffHead.forward`):
- t = sigmoid(mean + std * N(0, 1)) (logit-normal), mean -0.8 and std 0.8 in their runs;
  one t per predicted token;
- z_t = (1 - t) * eps + t * x with eps ~ N(0, I): t = 0 is pure noise, t = 1 the data;
- the network predicts x (bounded to [-1, 1] by 2 * sigmoid - 1 in the head) and both the
  target and the prediction are turned into velocities v = (x - z_t) / max(1 - t, 0.05);
- loss = mean squared error between the two velocities, over every element.
Since v_pred - v = (x_pred - x) / max(1 - t, 0.05), this is an x-prediction MSE weighted by
1 / max(1 - t, 0.05)^2: clean-end timesteps count up to 400 times more than noisy ones.
- `time_shift` is SANA's shift of t toward the noise end (their `time_shift_sana`, sigma 1),
  applied to the training t and to the sampler's grid; 1 leaves t unchanged;
- `flip_bits`: their generators read binary tokens with each bit flipped with probability
  p_max * u, u ~ U(0, 1) per element (`flip_tensor_elements_uniform_prob`, perturb rate 0.1):
  the inputs learn to tolerate the sampler's own mistakes; the targets stay clean.

Ming-UniVision (velocity prediction on continuous latents; SPECS section 4). Their sampler
(mingunivision/diff_loss_rf_swiglu.py `RectifiedFlowLoss.sample`) starts from noise at t = 1
and steps x <- x + v * dt while t falls to 0, so:
- x_t = t * eps + (1 - t) * x (`rectified_flow_path`): t = 1 is pure noise, t = 0 the data,
  the mirror image of BitDance's t;
- the network's velocity is the direction from noise to data, v = x - eps
  (`rectified_flow_velocity`), i.e. -dx_t/dt (their comment says x - v dt; their code adds);
- loss = mean squared error between the predicted and that velocity (`velocity_loss`),
  optionally weighted per token. Their release has no training code: the timestep
  distribution is ours (`sample_t`; logit-normal by default, SPECS [open]).
"""
import jax
import jax.numpy as jnp

P_MEAN = -0.8
P_STD = 0.8
MIN_DENOMINATOR = 0.05
T_DISTRIBUTIONS = ('logit_normal', 'uniform')


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


def time_shift(t: jax.Array, shift: float) -> jax.Array:
  """SANA's time shift, t / (t + shift (1 - t)) (= (1/s) / (1/s + 1/t - 1), finite at t = 0):
  shift > 1 moves t toward the noise end (t = 0); 1 is the identity. Shapes: any -> same."""
  if shift == 1.0:
    return t
  return t / (t + shift * (1.0 - t))


def flip_bits(rng: jax.Array, bits: jax.Array, max_rate: float) -> jax.Array:
  """bits in {-1, +1} with each element's sign flipped with probability max_rate * u,
  u ~ U(0, 1) drawn per element (so on average max_rate / 2 of them). Shapes: any -> same.
  """
  if not 0.0 <= max_rate <= 1.0:
    raise ValueError(f'bit flip rate {max_rate} must be in [0, 1]')
  if max_rate == 0.0:
    return bits
  r1, r2 = jax.random.uniform(rng, (2,) + bits.shape, jnp.float32)
  return jnp.where(r1 < max_rate * r2, -bits, bits)


def sample_t(rng: jax.Array, shape: tuple[int, ...], distribution: str = 'logit_normal',
             mean: float = P_MEAN, std: float = P_STD) -> jax.Array:
  """Training timesteps: 'logit_normal' (`sample_logit_normal_t` with mean, std) or
  'uniform' on [0, 1) (mean and std unused). Returns `shape` float32."""
  if distribution == 'logit_normal':
    return sample_logit_normal_t(rng, shape, mean, std)
  if distribution == 'uniform':
    return jax.random.uniform(rng, shape, jnp.float32)
  raise ValueError(f'timestep distribution {distribution!r} is not one of {T_DISTRIBUTIONS}')


def rectified_flow_path(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = t * eps + (1 - t) * x: t = 1 is pure noise, t = 0 the data (Ming-UniVision).

  `flow_interpolate` with the roles of its ends swapped, so both ends are exact.
  Shapes: x and eps (..., d); t broadcastable to x, e.g. (..., 1) for one t per token.
  """
  return flow_interpolate(eps, x, t)


def rectified_flow_velocity(x: jax.Array, eps: jax.Array) -> jax.Array:
  """The velocity target of `rectified_flow_path`: x - eps (noise to data, = -dx_t/dt), the
  direction an Euler step from t to t - dt adds: x_{t - dt} = x_t + dt * v. Shapes: (..., d)."""
  return x - eps


def velocity_loss(pred: jax.Array, target: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean squared velocity error, a float32 scalar.

  pred, target: (..., d). weights: None (mean over every element) or (...) per token, e.g. a
  0/1 mask: sum_i w_i mean_d (pred_i - target_i)^2 / sum_i w_i (0 when every weight is 0).
  """
  err = jnp.square(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))
  if weights is None:
    return jnp.mean(err)
  weights = jnp.asarray(weights, jnp.float32)
  per_token = jnp.mean(err, axis=-1)
  weights = jnp.broadcast_to(weights, per_token.shape)
  return jnp.sum(weights * per_token) / jnp.maximum(jnp.sum(weights), 1e-12)
