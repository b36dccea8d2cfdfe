"""UniWeTok on tiny configs: shapes, consistency of the entry points, variants, gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from unimm_jax.models.tokenizer_interface import TokenizerOutput
from unimm_jax.models.uniwetok import UniWeTok, downsample_factor

BATCH, SIZE = 2, 32


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_attn_blocks=1, num_heads=2,
                num_registers=4, groups=4, group_bits=4, siglu=True, double_channel_downsample=True,
                generative_decoder=True, entropy_temperature=0.01, dtype='float32', remat=False,
                attention_impl='xla', codebook_entropy_ratio=1.0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _aux(out: TokenizerOutput) -> dict:
  """A forward pass's loss terms and statistics in one dict."""
  return {**out.losses, **out.stats}


def _images(size=SIZE, seed=0):
  return jax.random.uniform(jax.random.key(seed), (BATCH, size, size, 3), minval=-1, maxval=1)


def _init(model, images):
  # 'rbg' keys: compiling an init full of threefry hashes takes CPU XLA about twice as long.
  rngs = {'params': jax.random.key(1, impl='rbg'), 'noise': jax.random.key(2, impl='rbg')}
  return jax.jit(lambda x: model.init(rngs, x, train=True))(images)


@pytest.fixture(scope='module')
def tiny():
  model = UniWeTok(tiny_config())
  images = _images()
  variables = _init(model, images)

  @jax.jit
  def run(variables, images, key):
    """Every entry point in one compile."""
    out = model.apply(variables, images, train=True, rngs={'noise': key})
    encoded = model.apply(variables, images, method=UniWeTok.encode)
    quantized, codes, aux = encoded.latents, encoded.codes, _aux(encoded)
    recon = model.apply(variables, quantized, method=UniWeTok.decode, rngs={'noise': key})
    from_codes = model.apply(variables, codes, method=UniWeTok.codes_to_quantized)
    u = model.apply(variables, images, method=lambda m, x: m.encoder(x))
    return out, (quantized, codes, aux), recon, from_codes, u

  other_noise_recon = run(variables, images, jax.random.key(9))[0].recon
  return model, variables, images, run(variables, images, jax.random.key(3)), other_noise_recon


def test_output_shapes_and_dtypes(tiny):
  _, _, _, (out, *_rest), _ = tiny
  assert isinstance(out, TokenizerOutput)
  assert out.recon.shape == (BATCH, SIZE, SIZE, 3) and out.recon.dtype == jnp.float32
  assert out.codes.shape == (BATCH, 8, 8, 4) and out.codes.dtype == jnp.int32
  assert out.latents.shape == (BATCH, 8, 8, 16)
  assert np.all((np.asarray(out.codes) >= 0) & (np.asarray(out.codes) < 16))
  np.testing.assert_array_equal(np.abs(out.latents), 1.0)
  for key in ('token_entropy', 'codebook_entropy', 'entropy', 'commitment'):
    assert _aux(out)[key].shape == () and np.isfinite(_aux(out)[key])
  assert _aux(out)['code_usage'].shape == (4,) and _aux(out)['bit_mean'].shape == (4, 4)
  assert np.all(np.isfinite(out.recon))


def test_encode_decode_agree_with_call(tiny):
  _, _, _, (out, (quantized, codes, aux), recon, from_codes, _), other_noise_recon = tiny
  np.testing.assert_array_equal(quantized, out.latents)
  np.testing.assert_array_equal(codes, out.codes)
  np.testing.assert_array_equal(from_codes, quantized)
  np.testing.assert_allclose(recon, out.recon, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux['token_entropy'], _aux(out)['token_entropy'], rtol=1e-6)
  # The generative decoder draws its noise from the 'noise' stream.
  assert not np.allclose(other_noise_recon, recon)


def test_siglu_bounds_the_encoder_output(tiny):
  _, _, _, (*_, u), _ = tiny
  assert u.shape == (BATCH, 8, 8, 16) and u.dtype == jnp.float32
  assert np.all(np.abs(u) < 1.0)


def test_params_carry_logical_axes(tiny):
  _, variables, _, _, _ = tiny
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree.leaves(variables['params'], is_leaf=is_boxed)
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
    assert leaf.value.dtype == jnp.float32
  rules = [('batch', 'data'), ('embed', 'fsdp'), ('conv_out', 'fsdp'), ('heads', 'tensor'),
           ('mlp', 'tensor')]
  specs = nn.logical_to_mesh(nn.get_partition_spec(variables), rules)
  assert specs['params']['encoder']['conv_in']['kernel'] == PartitionSpec(None, None, None, 'fsdp')


def test_traces_under_a_mesh_with_active_rules():
  """With rules active every boxed init and activation constraint is applied: ranks must match."""
  mesh = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  rules = [('batch', 'data'), ('embed', 'fsdp'), ('conv_out', 'fsdp'), ('heads', 'tensor'),
           ('mlp', 'tensor'), ('kv', None), ('length', None), ('conv_in', None)]
  model = UniWeTok(tiny_config())
  rngs = {'params': jax.random.key(0), 'noise': jax.random.key(0)}
  with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.eval_shape(lambda x: model.init_with_output(rngs, x, train=True)[0],
                         jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32))
  assert out.recon.shape == (2, SIZE, SIZE, 3)


def test_gradients_are_finite_and_reach_the_encoder(tiny):
  model, variables, images, _, _ = tiny

  def loss(params):
    out = model.apply({'params': params}, images, train=True, rngs={'noise': jax.random.key(4)})
    return jnp.mean(jnp.abs(out.recon - images)) + 0.1 * _aux(out)['entropy']

  grads = jax.jit(jax.grad(loss))(nn.unbox(variables['params']))
  flat = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in flat)
  # Straight-through: the reconstruction loss reaches the encoder's first conv.
  assert np.any(np.asarray(grads['encoder']['conv_in']['kernel']) != 0)
  assert np.any(np.asarray(grads['encoder']['mid_attn']['registers']) != 0)


def test_downsample_factor():
  assert downsample_factor(tiny_config()) == 4
  assert downsample_factor(tiny_config(ch_mult=(1, 1, 2, 2, 4, 8))) == 32


def _param_shapes(config, size=SIZE):
  model = UniWeTok(config)
  rngs = {'params': jax.random.key(0), 'noise': jax.random.key(0)}
  shapes = jax.eval_shape(lambda x: model.init(rngs, x, train=True),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return nn.unbox(shapes)['params']


def _random_params(shapes, seed=0):
  """Parameters of the given shapes drawn in numpy: skips compiling an init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.2, 0.2, s.shape), s.dtype), shapes)


def test_cnn_only_variant_and_deterministic_decoder():
  """num_attn_blocks=0 (CNN-only ablation) and generative_decoder=False: no 'noise' rng needed."""
  config = tiny_config(num_attn_blocks=0, generative_decoder=False, siglu=False)
  model = UniWeTok(config)
  params = _param_shapes(config)
  assert 'mid_attn' not in params['encoder'] and 'mid_attn' not in params['decoder']
  assert params['decoder']['conv_in']['kernel'].shape == (3, 3, 16, 32)
  images = _images(16)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  out = apply(_random_params(params), images)
  assert out.recon.shape == (BATCH, 16, 16, 3) and out.codes.shape == (BATCH, 4, 4, 4)


def test_generative_decoder_consumes_noise_channels():
  params = _param_shapes(tiny_config())
  assert params['decoder']['conv_in']['kernel'].shape == (3, 3, 2 * 16, 32)


def test_downsample_variants_place_the_channel_change():
  uni = _param_shapes(tiny_config(double_channel_downsample=True))['encoder']
  assert uni['down_0_downsample']['conv']['kernel'].shape == (3, 3, 16, 32)
  assert 'nin_shortcut' not in uni['down_1_block_0']
  wetok = _param_shapes(tiny_config(double_channel_downsample=False))['encoder']
  assert wetok['down_0_downsample']['conv']['kernel'].shape == (3, 3, 16, 16)
  assert wetok['down_1_block_0']['nin_shortcut']['kernel'].shape == (1, 1, 16, 32)


def test_decoder_levels_follow_the_authors_layout():
  dec = _param_shapes(tiny_config())['decoder']
  # AdaptiveGroupNorm maps z (16) to the width entering each level: 32, 32, 32 (top-down).
  for level, width in [(2, 32), (1, 32), (0, 32)]:
    assert dec[f'adaptive_{level}']['gamma']['kernel'].shape == (16, width)
  assert dec['up_0_block_0']['nin_shortcut']['kernel'].shape == (1, 1, 32, 16)
  assert 'up_0_upsample' not in dec
  assert dec['up_1_upsample']['conv1']['kernel'].shape == (3, 3, 32, 128)
  assert dec['conv_out']['kernel'].shape == (3, 3, 16, 3)


def test_paper_config_builds_64_tokens_at_256px():
  config = tiny_config(ch=128, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=2, num_attn_blocks=16,
                       num_heads=16, groups=16, group_bits=8)
  model = UniWeTok(config)
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  rngs = {'params': jax.random.key(0), 'noise': jax.random.key(0)}
  out, variables = jax.eval_shape(lambda x: model.init_with_output(rngs, x, train=True), images)
  assert out.codes.shape == (1, 8, 8, 16) and out.recon.shape == (1, 256, 256, 3)
  enc_attn = nn.unbox(variables)['params']['encoder']['mid_attn']['stack']['blocks_0']
  assert enc_attn['attention']['query'].shape == (1024, 16, 64)
  assert enc_attn['feed_forward']['w2']['kernel'].shape == (2816, 1024)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
  _, variables, _, _, _ = tiny  # compute dtype and remat leave the parameter tree unchanged
  model = UniWeTok(tiny_config(dtype='bfloat16', remat=True))
  shapes = _param_shapes(model.config)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, nn.unbox(variables)['params'])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  images = _images(16)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={'noise': jax.random.key(0)}))
  out = apply(variables, images)
  assert out.recon.dtype == jnp.float32 and out.latents.dtype == jnp.float32
  aux = _aux(out)
  assert aux["token_entropy"].dtype == jnp.float32 and np.isfinite(aux["token_entropy"])
  assert np.all(np.isfinite(out.recon))


def test_rejects_bad_inputs():
  with pytest.raises(ValueError, match='divisible by the downsample factor 4'):
    _param_shapes(tiny_config(), size=30)
  with pytest.raises(ValueError, match='num_heads'):
    _param_shapes(tiny_config(num_heads=3))
  with pytest.raises(ValueError, match='dtype'):
    _param_shapes(tiny_config(dtype='float16'))
