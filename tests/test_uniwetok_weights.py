"""Import of the authors' UniWeTok autoencoder weights: parity with their PyTorch model.

The fixtures come from tests/fixtures/make_uniwetok_fixture.py (their model code, a tiny
config, seeded random weights): their state dict, a few images, and what their model made of
them, including the N(0, 1) noise their decoder drew. Torch is not needed here.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import run_main
from unimm_jax import config_defaults
from unimm_jax.convert.uniwetok_weights import convert_state_dict, load_uniwetok_state_dict
from unimm_jax.models.uniwetok import UniWeTok, UniWeTokDecoder
from unimm_jax.inference import restore
from unimm_jax.train import from_checkpoint
from unimm_jax.train import trainer

pytestmark = pytest.mark.parity

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
STATE_DICT = os.path.join(FIXTURES, 'uniwetok_tiny_state_dict.safetensors')
REFERENCE = os.path.join(FIXTURES, 'uniwetok_tiny_reference.npz')
ATOL = 1e-4


def fixture_config():
  """configs/uniwetok.py:tiny with the widths their GroupNorm(32, C) allows (see the fixture
  script); every other architecture field must already agree with their constructor."""
  ref = np.load(REFERENCE)
  ddconfig = json.loads(str(ref['ddconfig']))
  cfg = config_defaults.load_config('configs/uniwetok.py:tiny').model
  assert (cfg.num_res_blocks, cfg.num_attn_blocks, cfg.num_heads) == (
      ddconfig['num_res_blocks'], ddconfig['attn_blocks'], ddconfig['n_heads'])
  assert cfg.groups * cfg.group_bits == ddconfig['z_channels']
  cfg.ch, cfg.ch_mult = ddconfig['ch'], tuple(ddconfig['ch_mult'])
  return cfg


@pytest.fixture(scope='module')
def loaded():
  """(model, params, reference arrays)."""
  cfg = fixture_config()
  params = load_uniwetok_state_dict(STATE_DICT, cfg)
  return UniWeTok(cfg), params, dict(np.load(REFERENCE))


def _decode_with_noise(model, params, quantized, noise):
  """Our decoder on `quantized` with their recorded `noise` in place of ours.

  Our decoder draws its noise from the 'noise' rng; the interceptor swaps the noise half of
  conv_in's input ([z, noise] on channels) for the recorded one.
  """
  z = quantized.shape[-1]
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if module.name == 'conv_in' and isinstance(module.parent, UniWeTokDecoder):
      seen.append('noise')
      x = args[0]
      args = (jnp.concatenate([x[..., :z], jnp.asarray(noise, x.dtype)], axis=-1),)
    return next_fun(*args, **kwargs)

  def decode(params, quantized):
    with nn.intercept_methods(interceptor):  # at trace time, so inside jit
      return model.apply({'params': params}, quantized, method=UniWeTok.decode,
                         rngs={'noise': jax.random.key(0)})

  recon = jax.jit(decode)(params, jnp.asarray(quantized))
  assert 'noise' in seen, 'the decoder no longer calls conv_in: update the noise injection'
  return np.asarray(recon)


def test_encoder_latents_codes_and_entropy_match(loaded):
  model, params, ref = loaded

  @jax.jit
  def encode(params, images):
    latents = model.apply({'params': params}, images, method=lambda m, x: m.encoder(x))
    return latents, model.apply({'params': params}, images, method=UniWeTok.encode)

  latents, encoded = encode(params, jnp.asarray(ref['images']))
  quantized, codes, aux = encoded.latents, encoded.codes, encoded.stats
  np.testing.assert_allclose(latents, ref['latents'], atol=ATOL, rtol=0)
  np.testing.assert_array_equal(quantized, ref['quantized'])
  np.testing.assert_array_equal(codes, ref['codes'])
  np.testing.assert_allclose(aux['token_entropy'], ref['token_entropy'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux['codebook_entropy'], ref['codebook_entropy'], rtol=1e-4)


def test_decoder_output_matches(loaded):
  model, params, ref = loaded
  recon = _decode_with_noise(model, params, ref['quantized'], ref['noise'])
  np.testing.assert_allclose(recon, ref['recon'], atol=ATOL, rtol=0)


@pytest.fixture(scope='module')
def tensors():
  return load_file(STATE_DICT)


def test_missing_key_is_named(tensors):
  broken = dict(tensors)
  del broken['decoder.up.1.block.0.nin_shortcut.weight']
  with pytest.raises(ValueError, match=r"missing key 'decoder\.up\.1\.block\.0\.nin_shortcut"):
    convert_state_dict(broken, fixture_config())


def test_wrong_shape_is_named(tensors):
  broken = dict(tensors)
  broken['encoder.mid_attn_blocks.0.attention.wqkv.weight'] = np.zeros((64, 64), np.float16)
  with pytest.raises(ValueError, match=r"'encoder\.mid_attn_blocks\.0\.attention\.wqkv\.weight' "
                                       r"has shape \(64, 64\), expected \(192, 64\)"):
    convert_state_dict(broken, fixture_config())


def test_unexpected_key_is_named(tensors):
  broken = dict(tensors, **{'encoder.mid_attn_blocks.1.ffn_norm.weight': np.ones(64)})
  with pytest.raises(ValueError, match=r"unexpected key 'encoder\.mid_attn_blocks\.1\.ffn_norm"):
    convert_state_dict(broken, fixture_config())


def test_unsupported_config_is_named(tensors):
  cfg = fixture_config()
  cfg.siglu = False
  with pytest.raises(ValueError, match='model_config.siglu'):
    convert_state_dict(tensors, cfg)


def test_ema_copy_is_preferred_and_training_extras_are_ignored(tensors):
  ema = np.full(tensors['encoder.conv_out.bias'].shape, 0.5, np.float32)
  extended = dict(tensors, **{
      'model_ema.encoderconv_outbias': ema,
      'model_ema.num_updates': np.array(7), 'model_ema.decay': np.array(0.999),
      'loss.discriminator.main.0.weight': np.zeros((8, 3, 4, 4), np.float32)})
  params = convert_state_dict(extended, fixture_config())
  np.testing.assert_array_equal(params['encoder']['conv_out']['bias'], ema)
  np.testing.assert_array_equal(params['encoder']['conv_in']['kernel'],
                                np.transpose(tensors['encoder.conv_in.weight'], (2, 3, 1, 0)))


@pytest.mark.e2e
def test_import_mode_writes_step_0_of_a_workdir(tmp_path):
  """`--mode=import` stores their weights as params and EMA of step 0; eval/encode/decode
  restore them, and training in place starts its data from the beginning."""
  cfg = fixture_config()
  workdir = tmp_path / 'authors'
  overrides = [f'--config.model.ch={cfg.ch}', f'--config.model.ch_mult={tuple(cfg.ch_mult)}']
  proc = run_main(workdir, f'--input={STATE_DICT}', *overrides, mode='import')
  assert f'imported {STATE_DICT} as step 0' in proc.stdout
  config = config_defaults.load_config('configs/uniwetok.py:tiny')
  config.model = cfg
  setup = trainer.Setup(config)
  _, params = restore.restore_eval_params(
      str(workdir), jax.eval_shape(setup.task.init_params, jax.random.key(0)), setup.context)
  expected = load_uniwetok_state_dict(STATE_DICT, cfg)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)
  # The checkpoint has no iterator state: a restore for training leaves the iterator new.
  checkpointer = setup.checkpointer(str(workdir))
  data_iter = setup.task.train_iterator(config.seed)
  with setup.activate():
    state, progress = checkpointer.restore(0, setup.abstract_state, data_iter)
  assert int(state.step) == 0 and progress == {'skipped_records': 0}
  np.testing.assert_array_equal(next(data_iter)['image'],
                                next(setup.task.train_iterator(config.seed))['image'])
  with pytest.raises(FileExistsError, match='already holds step 0'):
    from_checkpoint.import_weights(config, str(workdir), STATE_DICT)
  checkpointer.close()
