"""Chameleon's VQGAN: quantizer, parity with the authors' model and with transformers, weight
import (transformers `chameleon_vqgan` / `chameleon` directories, the authors' state dict),
and the tokenizer task (training steps, import, encode/decode).

The authors' reference comes from tests/fixtures/make_chameleon_vqgan_fixture.py (their
vqgan.py, a tiny config, seeded weights regenerated here from the recorded shapes). The
transformers models are built by the tests from those same weights (transformers keeps the
authors' tensor names), so one set of random, non-trivial weights (GroupNorm scales
1 + 0.3 N, biases 0.3 N) serves every comparison.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from unimm_jax import config_defaults
from unimm_jax.convert import chameleon_vqgan as convert_vqgan
from unimm_jax.convert import load_pretrained
from unimm_jax.models.chameleon_vqgan import ChameleonVQGAN
from unimm_jax.quantizers.vector_quantizer import VectorQuantizer
from unimm_jax.train import from_checkpoint
from unimm_jax.train import trainer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
sys.path.insert(0, FIXTURES)
from make_chameleon_vqgan_fixture import REFERENCE_FILE, random_state_dict  # noqa: E402

ATOL = 1e-4
TINY = 'configs/chameleon_vqgan.py:tiny'


# ------------------------------------------------------------------------------ quantizer

def _quantize(z, codebook, beta=0.25, legacy=True):
  vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], beta, legacy)
  return vq.apply({'params': {'embedding': jnp.asarray(codebook)}}, jnp.asarray(z))


def test_quantizer_picks_the_nearest_code_and_the_first_of_ties():
  codebook = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], np.float32)
  # (0.5, 0.5) is as far from codes 0, 1 and 2; (1, 0) is codes 0 and 2 exactly.
  z = np.array([[[0.5, 0.5], [1.0, 0.0], [0.1, 0.9], [-3.0, 0.2]]], np.float32)
  quantized, codes, _, stats = _quantize(z, codebook)
  np.testing.assert_array_equal(np.asarray(codes)[..., 0], [[0, 0, 1, 3]])
  np.testing.assert_array_equal(quantized, codebook[[0, 0, 1, 3]][None])
  np.testing.assert_allclose(stats['code_usage'], 3 / 4)
  p = np.array([2, 1, 1]) / 4
  np.testing.assert_allclose(stats['code_perplexity'], np.exp(-np.sum(p * np.log(p))),
                             rtol=1e-6)


@pytest.mark.parametrize('legacy', [True, False])
def test_embedding_loss_and_its_gradients_follow_the_closed_form(legacy):
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
  codebook = rng.standard_normal((7, 4)).astype(np.float32)
  beta = 0.25
  flat = z.reshape(-1, 4)
  codes = np.argmin(((flat[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
  zq = codebook[codes]
  mse = np.mean((zq - flat) ** 2)

  def loss(z, codebook):
    return _quantize(z, codebook, beta, legacy)[2]['embedding']

  value, (dz, dcodebook) = jax.value_and_grad(loss, argnums=(0, 1))(z, codebook)
  np.testing.assert_allclose(value, (1 + beta) * mse, rtol=1e-5)
  # legacy: the commitment (encoder) term has weight 1, the codebook term beta.
  encoder_weight, codebook_weight = (1.0, beta) if legacy else (beta, 1.0)
  np.testing.assert_allclose(dz.reshape(-1, 4), encoder_weight * 2 * (flat - zq) / flat.size,
                             rtol=1e-5, atol=1e-7)
  want = np.zeros_like(codebook)
  np.add.at(want, codes, codebook_weight * 2 * (zq - flat) / flat.size)
  np.testing.assert_allclose(dcodebook, want, rtol=1e-5, atol=1e-7)


def test_quantized_latents_pass_gradients_straight_through():
  rng = np.random.default_rng(1)
  z = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  codebook = rng.standard_normal((5, 3)).astype(np.float32)
  weights = rng.standard_normal(z.shape).astype(np.float32)
  grad = jax.grad(lambda z: jnp.sum(weights * _quantize(z, codebook)[0]))(z)
  np.testing.assert_allclose(grad, weights, rtol=1e-6)
  quantized, codes, _, _ = _quantize(z, codebook)
  vq = VectorQuantizer(5, 3)
  back = vq.apply({'params': {'embedding': jnp.asarray(codebook)}}, codes,
                  method=vq.codes_to_quantized)
  np.testing.assert_allclose(back, quantized, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the authors' reference

@pytest.fixture(scope='module')
def reference():
  with np.load(REFERENCE_FILE) as data:
    ref = {k: data[k] for k in data.files}
  ref['state_dict'] = random_state_dict(json.loads(str(ref['state_dict_shapes'])),
                                        int(ref['seed']))
  ref['ddconfig'] = json.loads(str(ref['ddconfig']))
  return ref


def fixture_model_config(ref, base=TINY):
  """The model block of `base` with the fixture's architecture (see the fixture script)."""
  dd = ref['ddconfig']
  config = config_defaults.load_config(base)
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks = dd['ch'], tuple(dd['ch_mult']), dd['num_res_blocks']
  m.norm_groups = 32  # their GroupNorm(32, C); the CPU configs use fewer groups
  # attention at resolution 16 of a 32 px `resolution`: level 1.
  m.attn_levels = tuple(i for i in range(len(dd['ch_mult']))
                        if dd['resolution'] // 2 ** i in dd['attn_resolutions'])
  m.z_channels, m.embed_dim, m.n_embed = dd['z_channels'], int(ref['embed_dim']), int(
      ref['n_embed'])
  return config


@pytest.fixture(scope='module')
def state_dict_file(reference, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('authors') / 'vqgan.safetensors')
  save_file(reference['state_dict'], path)
  return path


def _encode(model, variables, images):
  with jax.default_matmul_precision('highest'):
    return jax.jit(lambda v, x: model.apply(v, x, method='encode'))(variables, images)


@pytest.mark.parity
def test_the_authors_state_dict_reproduces_their_model(reference, state_dict_file):
  cfg = fixture_model_config(reference).model
  assert cfg.attn_levels == (1,)
  params = convert_vqgan.load_state_dict(state_dict_file, cfg)
  model, variables = ChameleonVQGAN(cfg), {'params': params}
  out = _encode(model, variables, reference['images'])
  np.testing.assert_allclose(out['encoder_output'], reference['h'], atol=ATOL)
  np.testing.assert_allclose(out.features['pre_quant'], reference['pre_quant'], atol=ATOL)
  np.testing.assert_array_equal(out.codes[..., 0], reference['codes'])
  np.testing.assert_allclose(out['quantized'], reference['quantized'], atol=ATOL)
  np.testing.assert_allclose(out['embedding_loss'], reference['emb_loss'], rtol=1e-4)
  with jax.default_matmul_precision('highest'):
    recon = jax.jit(lambda v, c: model.apply(v, c, method='decode_codes'))(
        variables, reference['codes'])
  np.testing.assert_allclose(recon, reference['recon'], atol=ATOL)


def test_a_tensor_that_does_not_fit_is_named(reference, state_dict_file, tmp_path):
  cfg = fixture_model_config(reference).model
  tensors = dict(reference['state_dict'])
  tensors['decoder.up.1.attn.0.q.weight'] = tensors['decoder.up.1.attn.0.q.weight'][:, :32]
  save_file(tensors, str(tmp_path / 'bad.safetensors'))
  with pytest.raises(ValueError, match=r'decoder\.up\.1\.attn\.0\.q\.weight'):
    convert_vqgan.load_state_dict(str(tmp_path / 'bad.safetensors'), cfg)
  tensors = dict(reference['state_dict'], **{'decoder.extra.weight': np.zeros(3, np.float32)})
  save_file(tensors, str(tmp_path / 'extra.safetensors'))
  with pytest.raises(ValueError, match=r'decoder\.extra\.weight'):
    convert_vqgan.load_state_dict(str(tmp_path / 'extra.safetensors'), cfg)
  cfg.n_embed = 32
  with pytest.raises(ValueError, match=r'quantize\.embedding\.weight'):
    convert_vqgan.load_state_dict(state_dict_file, cfg)


# --------------------------------------------------------------------------- transformers

def _vq_config_kwargs(ref):
  dd = ref['ddconfig']
  return dict(embed_dim=int(ref['embed_dim']), num_embeddings=int(ref['n_embed']),
              latent_channels=dd['z_channels'], resolution=dd['resolution'],
              base_channels=dd['ch'], channel_multiplier=dd['ch_mult'],
              num_res_blocks=dd['num_res_blocks'], attn_resolutions=dd['attn_resolutions'])


def _without_decoder(state_dict, prefix=''):
  import torch  # pylint: disable=import-outside-toplevel
  return {prefix + k: torch.from_numpy(v) for k, v in state_dict.items()
          if not k.startswith('decoder.')}


@pytest.fixture(scope='module')
def hf_vq(reference, tmp_path_factory):
  """(transformers ChameleonVQVAE with the fixture's weights, its save_pretrained dir)."""
  transformers = pytest.importorskip('transformers')
  model = transformers.ChameleonVQVAE(
      transformers.ChameleonVQVAEConfig(**_vq_config_kwargs(reference))).eval()
  model.load_state_dict(_without_decoder(reference['state_dict']), strict=True)
  path = str(tmp_path_factory.mktemp('chameleon_vqgan'))
  model.save_pretrained(path)
  return model, path


def _hf_encode(hf_model, images):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = hf_model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return (nhwc(out.last_hidden_state), nhwc(out.quantized_last_hidden_state),
          out.image_tokens.numpy().reshape(images.shape[0], -1), float(out.embedding_loss))


@pytest.mark.parity
def test_transformers_chameleon_vqgan_matches(reference, hf_vq, state_dict_file):
  hf_model, path = hf_vq
  images = np.random.default_rng(5).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  hidden, quantized, tokens, loss = _hf_encode(hf_model, images)
  result = load_pretrained(path)
  model, variables = result
  assert result.initialised == ('decoder',)
  out = _encode(model, variables, images)
  np.testing.assert_array_equal(out['image_tokens'], tokens)
  np.testing.assert_array_equal(out.codes.reshape(2, -1), tokens)
  np.testing.assert_allclose(out['encoder_output'], hidden, atol=ATOL)
  np.testing.assert_allclose(out['quantized'], quantized, atol=ATOL)
  np.testing.assert_allclose(out['embedding_loss'], loss, rtol=1e-4)
  # The authors' decoder from their state dict file completes the tokenizer.
  full = load_pretrained(path, decoder_path=state_dict_file)
  assert full.initialised == ()
  with jax.default_matmul_precision('highest'):
    recon = full[0].apply(full[1], reference['codes'], method='decode_codes')
  np.testing.assert_allclose(recon, reference['recon'], atol=ATOL)


@pytest.mark.parity
def test_full_chameleon_checkpoint_imports_the_llm_and_the_vq(reference, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  image_tokens = {f'IMGIMG{chr(65 + i)}Z': 100 + i for i in range(16)}
  config = transformers.ChameleonConfig(
      vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
      bos_token_id=None, eos_token_id=None, pad_token_id=None,
      vq_config=_vq_config_kwargs(reference),
      vocabulary_map={'<image>': 99, **image_tokens})
  torch.manual_seed(0)
  hf = transformers.ChameleonForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if 'vqmodel' not in name and 'norm' in name:
        p.normal_(1.0, 0.3) if name.endswith('weight') else p.normal_(0.0, 0.3)
  hf.model.vqmodel.load_state_dict(_without_decoder(reference['state_dict']), strict=True)
  hf.save_pretrained(str(tmp_path))

  result = load_pretrained(str(tmp_path))
  (llm, llm_vars), (vq, vq_vars) = result, result.parts['vqgan']
  assert result.initialised == ('vqgan/decoder',)
  ids = np.random.default_rng(0).integers(0, 99, size=(2, 7))
  images = reference['images'][:2]
  with torch.no_grad():
    logits = hf(torch.tensor(ids)).logits.numpy()
  _, quantized, tokens, _ = _hf_encode(hf.model.vqmodel, images)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(llm.apply)(llm_vars, ids))
  np.testing.assert_allclose(got, logits, atol=1e-4, rtol=1e-4)
  out = _encode(vq, vq_vars, images)
  np.testing.assert_array_equal(out['image_tokens'], tokens)
  np.testing.assert_array_equal(tokens, reference['codes'][:2].reshape(2, -1))
  np.testing.assert_allclose(out['quantized'], quantized, atol=ATOL)
  # The VQ alone, without placing the LLM, and checked against a config.model.
  cfg = fixture_model_config(reference).model
  _, alone = convert_vqgan.load_vqgan(str(tmp_path), cfg)
  jax.tree.map(np.testing.assert_array_equal, alone, vq_vars)
  cfg.z_channels = 16
  with pytest.raises(ValueError, match=r'z_channels=8, config.model.z_channels=16'):
    convert_vqgan.load_vqgan(str(tmp_path), cfg)


# ------------------------------------------------------------------------ tokenizer task

def test_tiny_config_trains_two_steps():
  config = config_defaults.load_config(TINY)
  setup = trainer.Setup(config)
  assert setup.task.layout.codes_per_token == 1 and setup.task.layout.codebook_size == 64
  state = setup.init_state()
  before = jax.device_get(state.params)
  images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  step = setup.compile_train_step()
  with setup.activate():
    for _ in range(2):
      state, metrics = step(state, setup.frozen,
                            {'image': setup.global_images(images, True)}, setup.train_rng)
  metrics = jax.device_get(metrics)
  np.testing.assert_allclose(metrics['loss'], metrics['l1'] + metrics['embedding'], rtol=1e-6)
  assert 0 < metrics['code_usage'] <= 1 and metrics['code_perplexity'] >= 1
  assert int(state.step) == 2 and int(metrics['nonfinite']) == 0
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params, before)
  assert moved['quantizer']['embedding'] > 0 and moved['decoder']['conv_out']['kernel'] > 0


@pytest.mark.parametrize('field,value', [('n_embed', 0), ('attn_levels', (5,)),
                                         ('beta', -1.0)])
def test_bad_model_fields_are_named_before_compiling(field, value):
  config = config_defaults.load_config(TINY)
  config.model[field] = value
  with pytest.raises(ValueError, match=rf'config\.model\.{field}='):
    trainer.Setup(config)


def test_import_then_encode_and_decode_folders(reference, state_dict_file, tmp_path):
  config = fixture_model_config(reference)
  config.data.image_size = 32
  workdir = str(tmp_path / 'run')
  from_checkpoint.import_weights(config, workdir, state_dict_file)
  images = tmp_path / 'images'
  images.mkdir()
  pixels = ((reference['images'][:2] + 1) * 127.5).round().astype(np.uint8)
  for i, p in enumerate(pixels):
    Image.fromarray(p).save(images / f'{i}.png')
  setup = trainer.Setup(config)
  codes_file, decoded = str(tmp_path / 'codes.npz'), tmp_path / 'decoded'
  setup.task.encode_folder(setup.context, workdir, str(images), codes_file)
  setup.task.decode_file(setup.context, workdir, codes_file, str(decoded))

  params = convert_vqgan.load_state_dict(state_dict_file, config.model)
  model = ChameleonVQGAN(config.model)
  want = _encode(model, {'params': params}, pixels.astype(np.float32) / 127.5 - 1)
  with np.load(codes_file) as data:
    assert list(data['names']) == ['0.png', '1.png'] and int(data['codebook_size']) == 16
    for i in range(2):
      np.testing.assert_array_equal(data[f'codes_{i:05d}'], want.codes[i])
  recon = model.apply({'params': params}, want.codes[..., 0], method='decode_codes')
  for i in range(2):
    png = np.asarray(Image.open(decoded / f'{i}.png'), np.float32)
    expected = (np.clip(np.asarray(recon[i]), -1, 1) + 1) * 127.5
    assert np.abs(png - expected).max() <= 1.0
