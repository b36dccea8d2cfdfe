"""Discriminators: shapes, the taming PatchGAN against a torch build of the published
architecture, global-batch BatchNorm on 8 sharded devices, and the StyleGAN option."""
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, subprocess_env
from unimm_jax.models.discriminator import (PatchGAN, StyleGANDiscriminator, blur_3x3,
                                            build_discriminator, minibatch_stddev)

# sum(p.numel()) of taming's NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3):
# convs 3136 + 131072 + 524288 + 2097152 + 8193, BatchNorm scale + bias 2 * (128 + 256 + 512).
TAMING_PATCHGAN_PARAMS = 2_765_633


def _count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _key(seed=0):
  # The 'rbg' generator compiles several times faster than threefry on CPU, which dominates
  # the cost of initialising these small networks.
  return jax.random.key(seed, impl='rbg')


def _images(b, size, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def patchgan():
  """The WeTok/EvoTok PatchGAN (ndf 64, 3 layers) initialised once for 32 px inputs."""
  model = PatchGAN(n_layers=3, ndf=64)
  variables = jax.jit(lambda x: model.init(_key(), x, train=False))(jnp.zeros((1, 32, 32, 3)))
  return model, variables


@pytest.mark.parametrize('size, out', [(64, 6), (256, 30)])
def test_patchgan_output_shape(size, out):
  """Padding 1, kernel 4: 256 -> 128 -> 64 -> 32 -> 31 -> 30 and 64 -> ... -> 8 -> 7 -> 6."""
  model = PatchGAN()
  logits, _ = jax.eval_shape(
      lambda x: model.init_with_output(_key(), x, train=True,
                                       mutable=['params', 'batch_stats']),
      jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  assert logits.shape == (2, out, out, 1) and logits.dtype == jnp.float32


def test_patchgan_parameters_layout_and_init(patchgan):
  _, variables = patchgan
  params = nn.unbox(variables['params'])
  assert _count(params) == TAMING_PATCHGAN_PARAMS
  assert sorted(params) == ['conv0', 'conv1', 'conv2', 'conv3', 'conv4', 'norm1', 'norm2',
                            'norm3']
  # Bias only where taming has it: not before BatchNorm.
  assert {k for k in params if 'bias' in params[k]} == {'conv0', 'conv4', 'norm1', 'norm2',
                                                        'norm3'}
  widths = [params[f'conv{i}']['kernel'].shape for i in range(5)]
  assert widths == [(4, 4, 3, 64), (4, 4, 64, 128), (4, 4, 128, 256), (4, 4, 256, 512),
                    (4, 4, 512, 1)]
  kernel = np.asarray(params['conv3']['kernel'])
  assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.02) < 1e-3
  scale = np.asarray(params['norm3']['scale'])
  assert abs(scale.mean() - 1.0) < 5e-3 and abs(scale.std() - 0.02) < 5e-3
  assert np.all(np.asarray(params['norm3']['bias']) == 0)
  assert np.all(np.asarray(params['conv4']['bias']) == 0)
  stats = variables['batch_stats']['norm2']
  assert np.all(np.asarray(stats['mean']) == 0) and np.all(np.asarray(stats['var']) == 1)
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree.leaves(variables['params'], is_leaf=is_boxed)
  assert all(is_boxed(x) and len(x.names) == x.value.ndim for x in leaves)
  assert variables['params']['conv1']['kernel'].names == (None, None, 'conv_in', 'conv_out')
  assert variables['params']['norm1']['scale'].names == ('conv_out',)


def _torch_patchgan(torch, input_nc=3, ndf=64, n_layers=3):
  """The published NLayerDiscriminator, layer by layer, from torch.nn."""
  tnn = torch.nn
  layers = [tnn.Conv2d(input_nc, ndf, 4, 2, 1), tnn.LeakyReLU(0.2)]
  mult = 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    layers += [tnn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
               tnn.BatchNorm2d(ndf * mult), tnn.LeakyReLU(0.2)]
  layers += [tnn.Conv2d(ndf * mult, 1, 4, 1, 1)]
  return tnn.Sequential(*layers)


def _copy_into_torch(torch, net, params):
  convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
  norms = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for i, c in enumerate(convs):
      c.weight.copy_(torch.from_numpy(np.asarray(params[f'conv{i}']['kernel']).transpose(
          3, 2, 0, 1).copy()))
      if c.bias is not None:
        c.bias.copy_(torch.from_numpy(np.array(params[f'conv{i}']['bias'])))
    for i, m in enumerate(norms, start=1):
      m.weight.copy_(torch.from_numpy(np.array(params[f'norm{i}']['scale'])))
      m.bias.copy_(torch.from_numpy(np.array(params[f'norm{i}']['bias'])))


@pytest.mark.parity
def test_patchgan_matches_torch_nlayer_discriminator(patchgan):
  """Same weights, same outputs: train mode (batch statistics), running statistics after one
  step (PyTorch's running variance is unbiased), then eval mode with those statistics."""
  torch = pytest.importorskip('torch')
  model, variables = patchgan
  params = nn.unbox(variables['params'])
  net = _torch_patchgan(torch)
  assert sum(p.numel() for p in net.parameters()) == TAMING_PATCHGAN_PARAMS
  _copy_into_torch(torch, net, params)
  x = _images(4, 32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updates = train_apply({'params': params,
                                 'batch_stats': variables['batch_stats']}, x)
  net.train()
  with torch.no_grad():
    expected = net(x_torch).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)

  norms = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
  sizes = [4 * 8 * 8, 4 * 4 * 4, 4 * 3 * 3]  # b * h * w at each BatchNorm for 32 px
  for i, (m, n) in enumerate(zip(norms, sizes), start=1):
    stats = updates['batch_stats'][f'norm{i}']
    np.testing.assert_allclose(stats['mean'], m.running_mean.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(0.9 + (stats['var'] - 0.9) * n / (n - 1), m.running_var.numpy(),
                               rtol=1e-4, atol=1e-6)

  # Eval mode on other images, with torch's running variance copied in for an exact match.
  batch_stats = jax.tree.map(np.asarray, updates['batch_stats'])
  for i, m in enumerate(norms, start=1):
    batch_stats[f'norm{i}']['var'] = m.running_var.numpy()
  y = _images(2, 32, seed=1)
  eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {'params': params, 'batch_stats': batch_stats}, y)
  net.eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(y.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(eval_logits, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


_SHARDED_BATCHNORM = textwrap.dedent('''
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from unimm_jax.config_defaults import DEFAULT_SHARDING_RULES
    from unimm_jax.models.discriminator import PatchGAN
    from unimm_jax.parallel.sharding import tree_shardings

    assert jax.device_count() == 8, jax.devices()
    model = PatchGAN(n_layers=3, ndf=16)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
    init = lambda x: model.init(jax.random.key(0, impl='rbg'), x, train=False)
    variables = nn.unbox(jax.jit(init)(x[:1]))
    # data 4 x fsdp 2: the batch splits over all 8 devices, conv channels over fsdp.
    mesh = jax.make_mesh((4, 2, 1), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
    var_shardings = tree_shardings(jax.eval_shape(init, x[:1]), mesh, DEFAULT_SHARDING_RULES)
    is_conv = lambda mdl, _: isinstance(mdl, nn.Conv)

    def step(v, x):
      logits, state = model.apply(v, x, train=True, capture_intermediates=is_conv,
                                  mutable=['batch_stats', 'intermediates'])
      return logits, state['batch_stats'], state['intermediates']

    single = jax.jit(step)(variables, x)
    with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_SHARDING_RULES):
      x_sharding = NamedSharding(mesh, P(('data', 'fsdp')))
      sharded_x = jax.device_put(x, x_sharding)
      assert len(sharded_x.addressable_shards) == 8
      assert sharded_x.addressable_shards[0].data.shape == (2, 32, 32, 3)
      sharded = jax.jit(step, in_shardings=(var_shardings, x_sharding))(
          jax.device_put(variables, var_shardings), sharded_x)
    assert sharded[0].addressable_shards[0].data.shape[0] < 16, sharded[0].sharding

    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 sharded[1], single[1])
    # From the initial (mean 0, var 1), one step gives 0.1 * batch mean, 0.9 + 0.1 * batch var
    # of the whole 16-image batch: numpy on the gathered conv outputs (the BatchNorm inputs).
    for n in (1, 2, 3):
      pre = np.asarray(sharded[2][f'conv{n}']['__call__'][0], np.float64)
      stats = sharded[1][f'norm{n}']
      np.testing.assert_allclose(stats['mean'], 0.1 * pre.mean(axis=(0, 1, 2)), rtol=1e-4,
                                 atol=1e-6)
      np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * pre.var(axis=(0, 1, 2)), rtol=1e-5,
                                 atol=1e-6)
    print('sharded batchnorm ok')
''')


@pytest.mark.e2e
def test_patchgan_batchnorm_on_8_sharded_devices_equals_one_device():
  proc = subprocess.run([sys.executable, '-c', _SHARDED_BATCHNORM], cwd=REPO,
                        env=subprocess_env(8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
  assert 'sharded batchnorm ok' in proc.stdout


def test_patchgan_rejects_zero_layers_and_too_small_images():
  shape = lambda model, size: jax.eval_shape(
      lambda x: model.init(_key(), x, train=False),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  with pytest.raises(ValueError, match='n_layers'):
    shape(PatchGAN(n_layers=0), 32)
  with pytest.raises(ValueError, match='too small'):
    shape(PatchGAN(), 16)  # 16 -> 8 -> 4 -> 2 -> 1 -> 0


# ----------------------------------------------------------------------------- StyleGAN


def _stylegan(**kw):
  return StyleGANDiscriminator(channel_base=128, channel_max=16, **kw)


def test_stylegan_shapes_widths_and_finite_gradients():
  model = _stylegan()
  x = jnp.asarray(_images(4, 16))
  variables = jax.jit(lambda x: model.init(_key(), x, train=True))(x)
  assert set(variables) == {'params'}  # no batch statistics
  params = nn.unbox(variables['params'])
  # 16 px: widths min(128 // r, 16) = 8 at 16, 16 below; blocks 16 -> 8 -> 4.
  assert sorted(params) == ['block_16', 'block_8', 'final_conv', 'final_dense', 'from_rgb',
                            'out']
  assert params['from_rgb']['kernel'].shape == (3, 3, 3, 8)
  assert params['block_16']['skip']['kernel'].shape == (1, 1, 8, 16)
  assert params['final_conv']['kernel'].shape == (3, 3, 17, 16)  # + 1 minibatch-stddev map
  assert params['final_dense']['kernel'].shape == (4 * 4 * 16, 16)

  def loss(p, x):
    logits = model.apply({'params': p}, x, train=True)
    return jnp.mean(jax.nn.softplus(-logits)), logits

  (grads, x_grad), logits = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  assert logits.shape == (4, 1) and logits.dtype == jnp.float32
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.all(np.isfinite(x_grad)) and np.any(x_grad != 0)
  assert np.any(np.asarray(grads['from_rgb']['kernel']) != 0)


def test_stylegan_options_keep_parameters():
  """Blur has no parameters; without minibatch stddev the final conv reads 16 channels."""
  shapes = lambda m: jax.tree.map(lambda a: a.shape, nn.unbox(jax.eval_shape(
      lambda x: m.init(_key(), x, train=False),
      jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))['params']))
  assert shapes(_stylegan(blur=False)) == shapes(_stylegan())
  assert shapes(_stylegan(mbstd_group_size=0))['final_conv']['kernel'] == (3, 3, 16, 16)
  with pytest.raises(ValueError, match='power-of-two'):
    jax.eval_shape(lambda x: _stylegan().init(_key(), x, train=False),
                   jax.ShapeDtypeStruct((2, 24, 24, 3), jnp.float32))


def test_minibatch_stddev_against_numpy():
  x = np.random.default_rng(4).standard_normal((6, 3, 3, 4)).astype(np.float32)
  out = np.asarray(minibatch_stddev(jnp.asarray(x), group_size=3, num_features=2))
  assert out.shape == (6, 3, 3, 6)
  np.testing.assert_array_equal(out[..., :4], x)
  for group in range(2):
    members = x[group * 3:(group + 1) * 3]  # consecutive samples
    for f in range(2):
      chunk = members[..., f * 2:(f + 1) * 2]
      expected = np.mean(np.sqrt(chunk.var(axis=0) + 1e-8))
      np.testing.assert_allclose(out[group * 3:(group + 1) * 3, :, :, 4 + f], expected,
                                 rtol=1e-5)
  with pytest.raises(ValueError, match='divisible'):
    minibatch_stddev(jnp.asarray(x[:5]), group_size=3)


def test_blur_3x3_against_numpy():
  x = np.random.default_rng(5).standard_normal((1, 5, 4, 2)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  k = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
  expected = np.zeros_like(x)
  for i in range(5):
    for j in range(4):
      expected[0, i, j] = np.einsum('hwc,hw->c', padded[0, i:i + 3, j:j + 3], k)
  np.testing.assert_allclose(blur_3x3(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- builder


def test_build_discriminator():
  cfg = ml_collections.ConfigDict(dict(name='patchgan', n_layers=3, ndf=64,
                                       stylegan_channel_base=4096, stylegan_channel_max=512))
  disc = build_discriminator(cfg)
  assert isinstance(disc, PatchGAN) and (disc.n_layers, disc.ndf) == (3, 64)
  cfg.name = 'stylegan'
  disc = build_discriminator(cfg)
  assert isinstance(disc, StyleGANDiscriminator)
  assert (disc.channel_base, disc.channel_max, disc.blur, disc.mbstd_group_size) == (
      4096, 512, True, 4)
  cfg.name = 'unet'
  with pytest.raises(ValueError, match=r"config\.disc\.name='unet'"):
    build_discriminator(cfg)
  cfg.name, cfg.dtype = 'patchgan', 'bfloat16'
  assert build_discriminator(cfg).dtype == jnp.bfloat16
  cfg.dtype = 'float16'
  with pytest.raises(ValueError, match=r"config\.disc\.dtype='float16'"):
    build_discriminator(cfg)
