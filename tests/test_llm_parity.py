"""HF import of Qwen2, Qwen3, Llama and Chameleon against transformers itself (float32).

Each tiny model is built by transformers from a seeded random init (std 0.5, so greedy tokens
vary instead of repeating one token), with its norm scales and biases drawn away from 1 and 0
so a swapped or untransposed tensor cannot pass, then written once per module with
`save_pretrained` and imported with `load_pretrained`.
"""
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from unimm_jax.convert import load_pretrained  # noqa: E402
from unimm_jax.inference import sampling  # noqa: E402

pytestmark = pytest.mark.parity

VOCAB = 160
PAD = 0
MAX_NEW = 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
# Chameleon's image tokenizer, as small as its GroupNorm(32) allows; skipped by the import.
_VQ = dict(embed_dim=8, num_embeddings=16, latent_channels=32, resolution=16, base_channels=32,
           channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[])
_IMAGE_TOKENS = {f'IMGIMG{chr(65 + i)}Z': 150 + i for i in range(8)}


def _cases():
  return {
      'qwen2_tied': (transformers.Qwen2ForCausalLM,
                     transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True,
                                              rope_parameters=dict(rope_type='default',
                                                                   rope_theta=500.0))),
      'qwen3': (transformers.Qwen3ForCausalLM,
                transformers.Qwen3Config(**_COMMON, head_dim=16, attention_bias=True)),
      'llama_llama3_rope': (transformers.LlamaForCausalLM, transformers.LlamaConfig(
          **_COMMON, mlp_bias=True, rope_parameters=dict(
              rope_type='llama3', rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=64))),
      'llama_linear_rope': (transformers.LlamaForCausalLM, transformers.LlamaConfig(
          **_COMMON, attention_bias=True,
          rope_parameters=dict(rope_type='linear', rope_theta=100.0, factor=3.0))),
      'chameleon': (transformers.ChameleonForConditionalGeneration, transformers.ChameleonConfig(
          **_COMMON, vq_config=_VQ, vocabulary_map={'<image>': 149, **_IMAGE_TOKENS})),
      'chameleon_swin': (transformers.ChameleonForConditionalGeneration,
                         transformers.ChameleonConfig(
                             **_COMMON, swin_norm=True, vq_config=_VQ,
                             vocabulary_map={'<image>': 149, **_IMAGE_TOKENS})),
  }


# Generation runs the same code for every family: the four families, not every variant.
_GENERATION_CASES = ('qwen2_tied', 'qwen3', 'llama_llama3_rope', 'chameleon')


def _randomize(model):
  """Norm scales ~ 1 + N(0, 0.3^2), biases ~ N(0, 0.3^2); the decoder only."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'vqmodel' in name:
        continue
      if name.endswith('bias'):
        p.normal_(0.0, 0.3)
      elif 'norm' in name:
        p.normal_(1.0, 0.3)


@pytest.fixture(scope='module', params=list(_cases()))
def family(request, tmp_path_factory):
  """(name, transformers model, imported (model, variables), checkpoint dir)."""
  cls, config = _cases()[request.param]
  torch.manual_seed(0)
  hf_model = cls(config).eval()
  _randomize(hf_model)
  path = str(tmp_path_factory.mktemp(request.param))
  hf_model.save_pretrained(path)
  return request.param, hf_model, load_pretrained(path), path


def _prompts():
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 140, size=(2, 9))
  mask = np.ones_like(ids)
  ids[1, :4], mask[1, :4] = PAD, 0  # row 1: 5 real tokens, left-padded
  return ids, mask


def test_logits_match_transformers(family):
  name, hf_model, (model, variables), _ = family
  ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 11))
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(model.apply)(variables, ids))
  assert got.shape == (2, 11, VOCAB)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=name)
  if name.startswith('chameleon'):  # its text head forbids image tokens
    assert (got[..., 150:158] == np.finfo(np.float32).min).all()


def _hf_generate(hf_model, ids, mask, eos):
  with torch.no_grad():
    out = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD,
                            eos_token_id=eos).numpy()[:, ids.shape[1]:]
  # transformers stops when every row is done; ours always returns MAX_NEW columns.
  return np.pad(out, ((0, 0), (0, MAX_NEW - out.shape[1])), constant_values=PAD)


@pytest.mark.parametrize('family', _GENERATION_CASES, indirect=True)
def test_greedy_generation_matches_transformers(family):
  name, hf_model, (model, variables), path = family
  if name == 'llama_llama3_rope':  # the scanned import (stacked layer views), exercised here
    model, variables = load_pretrained(path, scan_layers=True)
  ids, mask = _prompts()
  expected = _hf_generate(hf_model, ids, mask, eos=None)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(sampling.generate(model, variables['params'], ids, MAX_NEW,
                                       attention_mask=mask))
  np.testing.assert_array_equal(got, expected, err_msg=name)
  # An EOS that row 0 produces midway: row 0 stops there, row 1 runs on (or stops too).
  eos = int(expected[0, 3])
  expected = _hf_generate(hf_model, ids, mask, eos=eos)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(sampling.generate(model, variables['params'], ids, MAX_NEW,
                                       eos_ids=(eos,), pad_id=PAD, attention_mask=mask))
  np.testing.assert_array_equal(got, expected, err_msg=f'{name} with eos {eos}')


def _rewrite(src: str, dst: str, edit) -> str:
  """Copies a checkpoint directory with its tensors changed by `edit(dict)`."""
  os.makedirs(dst)
  with open(os.path.join(src, 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(config, f)
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  edit(tensors)
  save_file(tensors, os.path.join(dst, 'model.safetensors'))
  return dst


@pytest.fixture(scope='module')
def qwen3_dir(tmp_path_factory):
  cls, config = _cases()['qwen3']
  torch.manual_seed(0)
  path = str(tmp_path_factory.mktemp('qwen3_errors'))
  cls(config).save_pretrained(path)
  return path


@pytest.mark.parametrize('key, shape', [
    ('model.norm.weight', (33,)),  # a plain wrong length
    ('model.layers.1.self_attn.q_proj.weight', (63, 32)),  # cannot be split into heads
    ('model.layers.0.self_attn.k_norm.weight', (8,)),
])
@pytest.mark.parametrize('scan', [False, True])
def test_wrong_tensor_shape_names_the_tensor(qwen3_dir, tmp_path, key, shape, scan):
  def edit(tensors):
    tensors[key] = np.zeros(shape, np.float32)
  path = _rewrite(qwen3_dir, str(tmp_path / 'bad'), edit)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    load_pretrained(path, scan_layers=scan)


def test_unknown_and_missing_tensors_are_named(qwen3_dir, tmp_path):
  def add(tensors):
    tensors['model.layers.0.self_attn.extra.weight'] = np.zeros((2,), np.float32)
  with pytest.raises(ValueError, match=r'model\.layers\.0\.self_attn\.extra\.weight'):
    load_pretrained(_rewrite(qwen3_dir, str(tmp_path / 'extra'), add))

  def drop(tensors):
    del tensors['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.up_proj\.weight'):
    load_pretrained(_rewrite(qwen3_dir, str(tmp_path / 'missing'), drop))


@pytest.mark.parametrize('change, message', [
    (dict(use_sliding_window=True, sliding_window=4), 'use_sliding_window'),
    (dict(layer_types=['full_attention', 'sliding_attention']), 'sliding_attention'),
    (dict(rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=2.0)), 'yarn'),
    (dict(hidden_act='gelu'), 'hidden_act'),
])
def test_unsupported_config_is_named(qwen3_dir, tmp_path, change, message):
  path = _rewrite(qwen3_dir, str(tmp_path / 'cfg'), lambda tensors: None)
  with open(os.path.join(path, 'config.json')) as f:
    config = json.load(f)
  config.update(change)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=message):
    load_pretrained(path)
