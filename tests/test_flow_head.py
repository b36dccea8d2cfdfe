"""Ming-UniVision's rectified-flow head: the authors' weights give their velocities and their
Euler samples with two-scale CFG; CFG scales (1, 1) are the conditional stream to the bit;
t = 1 is noise and the loss's target is what the sampler integrates; the loss is minimised by
the true velocity; a checkpoint that does not fit names the tensor.

The reference is tests/fixtures/make_flow_head_fixture.py: their own head, tiny and random
(see its docstring for the sizes and the sampling cases).
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unimm_jax.convert import ming_univision_weights
from unimm_jax.losses import diffusion
from unimm_jax.models import flow_head
from unimm_jax.models.flow_head import FlowHead, FlowHeadConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
STATE_DICT = os.path.join(FIXTURES, "flow_head_tiny_state_dict.safetensors")
REFERENCE = np.load(os.path.join(FIXTURES, "flow_head_tiny_reference.npz"))
SHAPE = json.loads(str(REFERENCE["config"]))["head"]


def fixture_config(**overrides) -> FlowHeadConfig:
  fields = dict(input_width=SHAPE["hidden_size"], width=SHAPE["diffloss_w"],
                depth=SHAPE["diffloss_d"], latent_dim=SHAPE["image_emb_dim_for_gen"],
                mlp_ratio=float(SHAPE["gen_method"].split("-")[1]))
  return FlowHeadConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def imported():
  head = FlowHead(fixture_config())
  return head, ming_univision_weights.load_flow_head(STATE_DICT, head)


def _cfg_sampler(head):
  """jit(params, streams, noise, text_scale, image_scale): 2 or 3 streams, traced scales."""
  def run(params, streams, noise, text_scale, image_scale, time_shift=None):
    text_uncond = streams[1] if len(streams) == 3 else None
    return flow_head.sample_cfg(head, params, streams[0], text_uncond, streams[-1], noise,
                                text_scale=text_scale, image_scale=image_scale,
                                time_shift=time_shift)
  return jax.jit(run, static_argnames="time_shift")


@pytest.mark.parity
def test_authors_weights_give_their_velocities(imported):
  head, params = imported
  condition = jax.jit(lambda p, h: head.apply({"params": p}, h, method="condition"))(
      params, REFERENCE["hidden"])
  np.testing.assert_allclose(condition, REFERENCE["condition"], atol=1e-5, rtol=0)
  apply = jax.jit(lambda p, x, t, h: head.apply({"params": p}, x, t, h))
  velocity = apply(params, REFERENCE["x_t"], REFERENCE["t"], REFERENCE["hidden"])
  np.testing.assert_allclose(velocity, REFERENCE["velocity"], atol=1e-5, rtol=0)
  # Any leading shape: (2, 3) tokens give the same rows.
  grid = apply(params, REFERENCE["x_t"].reshape(2, 3, -1), REFERENCE["t"].reshape(2, 3),
               REFERENCE["hidden"].reshape(2, 3, -1))
  np.testing.assert_allclose(grid.reshape(6, -1), velocity, atol=1e-5, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("case", ["cfg3", "cfg2", "plain", "shift"])
def test_authors_sampler_with_shared_noise_gives_their_latents(imported, case):
  """16 Euler steps from t = 1; CFG text 3.0 / image 1.1 (their defaults), one noise per
  token shared by its streams; their optional time shift."""
  head, params = imported
  streams, noise = REFERENCE[f"hidden_{case}"], REFERENCE[f"noise_{case}"]
  if len(streams) == 1:
    latent = jax.jit(lambda p, h, z: flow_head.sample(head, p, h, z))(params, streams[0], noise)
  else:
    latent = _cfg_sampler(head)(params, tuple(streams), noise, flow_head.TEXT_SCALE,
                                flow_head.IMAGE_SCALE, 3.0 if case == "shift" else None)
  np.testing.assert_allclose(latent, REFERENCE[f"latent_{case}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_streams", [3, 2])
def test_cfg_scales_one_give_the_conditional_stream_exactly(imported, num_streams):
  head, params = imported
  streams, noise = REFERENCE["hidden_cfg3"], REFERENCE["noise_cfg3"]
  streams = tuple(streams if num_streams == 3 else streams[[0, 2]])
  alone = jax.jit(lambda p, h, z: flow_head.sample(head, p, h, z))(params, streams[0], noise)
  guided = _cfg_sampler(head)(params, streams, noise, 1.0, 1.0)
  np.testing.assert_array_equal(guided, alone)
  # Other scales do guide: the result moves away from the conditional sample.
  assert np.abs(_cfg_sampler(head)(params, streams, noise, 3.0, 1.1) - alone).max() > 0.1


def test_guided_velocity_is_their_formula():
  v_c, v_tu, v_u = (jnp.asarray(np.random.default_rng(i).standard_normal((4, 8)), jnp.float32)
                    for i in range(3))
  for s_text, s_img in [(3.0, 1.1), (1.0, 2.0), (0.0, 0.0), (5.0, 1.0)]:
    theirs = v_u + s_img * (v_tu - v_u) + s_text * (v_c - v_tu)
    np.testing.assert_allclose(flow_head.guided_velocity(v_c, v_tu, v_u, s_text, s_img), theirs,
                               atol=1e-5)
    np.testing.assert_allclose(flow_head.guided_velocity(v_c, None, v_u, s_text),
                               v_u + s_text * (v_c - v_u), atol=1e-5)


def test_t_one_is_noise_and_the_sampler_integrates_the_loss_target():
  """x_t at t = 1 is the noise and at t = 0 the data, exactly; the loss's target for a point
  mass x0 is (x0 - x_t) / t, and Euler on it from the noise lands on x0 (each step scales the
  error by t_{k+1} / t_k, so it reaches 0 at t = 0), with or without the time shift."""
  rng = np.random.default_rng(0)
  x0, eps = (jnp.asarray(rng.standard_normal((5, 8)), jnp.float32) for _ in range(2))
  np.testing.assert_array_equal(diffusion.rectified_flow_path(x0, eps, 1.0), eps)
  np.testing.assert_array_equal(diffusion.rectified_flow_path(x0, eps, 0.0), x0)
  t = 0.3
  x_t = diffusion.rectified_flow_path(x0, eps, t)
  np.testing.assert_allclose(diffusion.rectified_flow_velocity(x0, eps), (x0 - x_t) / t,
                             atol=1e-5)
  for shift in (None, 3.0):
    landed = flow_head.euler_integrate(lambda x, t: (x0 - x) / t, eps, 16, shift)
    np.testing.assert_allclose(landed, x0, atol=1e-5)
  ts, dts = flow_head.euler_timesteps(16)
  np.testing.assert_array_equal(ts, 1.0 - np.arange(16, dtype=np.float32) / 16)
  np.testing.assert_allclose(dts, 1 / 16)
  ts, dts = flow_head.euler_timesteps(16, 3.0)
  s = np.linspace(0, 1, 17)
  t_all = 1 - s / (s + 3.0 - 3.0 * s)
  np.testing.assert_allclose(ts, t_all[:-1], atol=1e-7)
  np.testing.assert_allclose(dts, -np.diff(t_all), atol=1e-7)


def test_loss_is_minimised_by_the_true_velocity():
  """1-d Gaussian data x ~ N(0, s^2) at a fixed t: E[x - eps | x_t] = x_t ((1 - t) s^2 - t) /
  ((1 - t)^2 s^2 + t^2). Among predictions c * v*, the Monte-Carlo loss is smallest at
  c = 1, and v* beats the exact point-wise target's neighbours; per-token weights mask."""
  key_x, key_eps = jax.random.split(jax.random.key(0))
  n, s, t = 200_000, 1.5, 0.4
  x = s * jax.random.normal(key_x, (n, 1))
  eps = jax.random.normal(key_eps, (n, 1))
  x_t = diffusion.rectified_flow_path(x, eps, t)
  target = diffusion.rectified_flow_velocity(x, eps)
  v_star = x_t * ((1 - t) * s**2 - t) / ((1 - t) ** 2 * s**2 + t**2)
  scales = np.linspace(0.8, 1.2, 9)
  losses = [float(diffusion.velocity_loss(c * v_star, target)) for c in scales]
  assert int(np.argmin(losses)) == 4, losses
  # The quadratic's minimiser, <v*, target> / <v*, v*>, is 1 up to Monte-Carlo error.
  assert abs(float(jnp.vdot(v_star, target) / jnp.vdot(v_star, v_star)) - 1) < 0.01
  # Weights: a 0-weight token does not count; weights give a weighted mean.
  pred = jnp.zeros((3, 2))
  target = jnp.array([[1.0, 1.0], [2.0, 2.0], [100.0, 0.0]])
  np.testing.assert_allclose(diffusion.velocity_loss(pred, target, jnp.array([1.0, 3.0, 0.0])),
                             (1 * 1 + 3 * 4) / 4, rtol=1e-6)
  assert float(diffusion.velocity_loss(pred, target, jnp.zeros(3))) == 0.0


def test_head_loss_trains_and_masks(imported):
  """The module's loss: finite, with gradients, and tokens of weight 0 do not change it."""
  head, params = imported
  cfg = head.config
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, cfg.latent_dim)), jnp.float32)
  hidden = jnp.asarray(rng.standard_normal((2, 3, cfg.input_width)), jnp.float32)
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])

  def loss_fn(p, x):
    return head.apply({"params": p}, x, hidden, weights, method="loss",
                      rngs={"noise": jax.random.key(2)})

  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = loss_and_grad(params, x)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  moved = x.at[0, 2].add(10.0).at[1, 1].add(-10.0)
  np.testing.assert_array_equal(loss_and_grad(params, moved)[0], loss)


def test_timestep_distributions():
  """t = 1 is noise: the default logit-normal (mean +0.8, std 0.8) puts BitDance's share of
  draws near the noise end; 'uniform' covers [0, 1)."""
  key = jax.random.key(3)
  cfg = FlowHeadConfig()
  t = diffusion.sample_t(key, (100_000,), cfg.t_distribution, cfg.t_mean, cfg.t_std)
  bitdance = diffusion.sample_logit_normal_t(key, (100_000,))  # t = 0 is noise there
  np.testing.assert_allclose(np.mean(t > 0.5), np.mean(bitdance < 0.5), atol=0.01)
  assert float(jnp.mean(t)) > 0.6
  u = diffusion.sample_t(key, (100_000,), "uniform")
  assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
  with pytest.raises(ValueError, match="cosine"):
    diffusion.sample_t(key, (2,), "cosine")


def test_paper_sizes():
  cfg = FlowHeadConfig()
  assert cfg.hidden_dim == 8192  # (int(12288 * 2 / 3) + 7) // 8 * 8
  shapes = jax.eval_shape(lambda: FlowHead(cfg).init(
      jax.random.key(0), jnp.zeros((1, 32)), jnp.zeros((1,)), jnp.zeros((1, 2048))))
  params = flax.linen.unbox(shapes["params"])
  assert params["condition_proj"]["kernel"].shape == (2048, 3072)
  assert params["net"]["res_blocks_11"]["mlp"]["w1"].shape == (3072, 2, 8192)
  assert "res_blocks_12" not in params["net"]
  with pytest.raises(ValueError, match="t_distribution"):
    FlowHeadConfig(t_distribution="cosine")


@pytest.mark.parametrize("field, value, needle", [
    ("depth", 3, "model.diffloss.net.res_blocks.2.in_ln.weight"),
    ("input_width", 32, "model.vis_head.0.weight"),
    ("latent_dim", 16, "model.diffloss.net.input_proj.weight"),
    ("mlp_ratio", 2.0, "model.diffloss.net.res_blocks.0.mlp.w12.weight"),
])
def test_a_checkpoint_that_does_not_fit_names_the_tensor(field, value, needle):
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    ming_univision_weights.load_flow_head(STATE_DICT, FlowHead(fixture_config(**{field: value})))


def test_a_mis_shaped_or_extra_tensor_is_named(tmp_path):
  tensors = load_file(STATE_DICT)
  key = "model.diffloss.net.final_layer.adaLN_modulation.1.bias"
  bad = dict(tensors, **{key: tensors[key][:-2]})
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    ming_univision_weights.load_flow_head(str(tmp_path / "bad.safetensors"),
                                          FlowHead(fixture_config()))
  extra = dict(tensors, **{"model.diffloss.net.spare.weight": tensors[key],
                           "model.model.layers.0.mlp.weight": tensors[key]})
  save_file(extra, str(tmp_path / "extra.safetensors"))
  with pytest.raises(ValueError, match=r"not used by the flow head.*spare\.weight"):
    ming_univision_weights.load_flow_head(str(tmp_path / "extra.safetensors"),
                                          FlowHead(fixture_config()))
