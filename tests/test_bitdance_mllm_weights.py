"""BitDance MLLM import: the authors' vision head and input connector, loaded from their
MLLModel state dict, give their x estimates and connector outputs; `sincos_2d` is their
get_2d_embed; their two-head attention splits as ours; their released split files load the
same; their LLM converts with the Qwen3 converter; a checkpoint that does not fit names the
tensor.

The reference is tests/fixtures/make_bitdance_mllm_fixture.py: their own modules, tiny and
random (model A: their 14B head settings with SwiGLU; model B: use_swiglu False; see its
docstring).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unimm_jax.convert import bitdance_mllm_weights as weights
from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert import hf_llm
from unimm_jax.convert import load_pretrained
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.embeddings import sincos_2d
from unimm_jax.nn.mlp import Projector

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
STATE_DICTS = {'a': os.path.join(FIXTURES, 'bitdance_mllm_tiny_state_dict.safetensors'),
               'b': os.path.join(FIXTURES, 'bitdance_mllm_tiny_variant_state_dict.safetensors')}
REFERENCE = np.load(os.path.join(FIXTURES, 'bitdance_mllm_tiny_reference.npz'))
CONFIG = json.loads(str(REFERENCE['config']))
DIMS = dict(latent_dim=CONFIG['latent_dim'], hidden_size=CONFIG['hidden_size'])
PREFIX = 'vision_diffusion_head.net.'


def their_head(model: str, **overrides):
  settings = {**CONFIG['models'][model], **overrides}
  return weights.vision_head(settings['model_dim'], settings['num_blocks'],
                             settings['num_adaln'], settings['use_swiglu'])


@pytest.fixture(scope='module', params=['a', 'b'])
def imported(request):
  head = their_head(request.param)
  return request.param, head, weights.load_mllm_heads(STATE_DICTS[request.param], head, **DIMS)


def _run(head, params, z, t, cond):
  """Their net takes one t per row (n,); ours one per token (n, m)."""
  t = jnp.broadcast_to(jnp.asarray(t)[:, None], z.shape[:2])
  return jax.jit(lambda p, z, t, c: head.apply({'params': p}, z, t, c))(params, z, t, cond)


@pytest.mark.parity
def test_authors_head_gives_their_x_estimate(imported):
  model, head, params = imported
  x = _run(head, params['head'], REFERENCE['z'], REFERENCE['t'], REFERENCE['cond'])
  np.testing.assert_allclose(x, REFERENCE[f'x_{model}'], atol=1e-5, rtol=0)
  assert np.abs(REFERENCE[f'x_{model}']).max() < 1 and REFERENCE[f'x_{model}'].std() > 0.3
  if model == 'a':  # a row of 36 tokens: their flash-attention path (parallel_num 64)
    long = _run(head, params['head'], REFERENCE['z_long'], REFERENCE['t_long'],
                REFERENCE['cond_long'])
    np.testing.assert_allclose(long, REFERENCE['x_a_long'], atol=1e-5, rtol=0)


@pytest.mark.parity
def test_authors_connector_gives_their_embeddings(imported):
  model, _, params = imported
  out = weights.connector(DIMS['hidden_size']).apply({'params': params['connector']},
                                                     REFERENCE['bits'])
  np.testing.assert_allclose(out, REFERENCE[f'connector_{model}'], atol=1e-5, rtol=0)
  # Their GELU is the tanh approximation: the exact one is measurably off.
  exact = Projector(DIMS['hidden_size'], DIMS['hidden_size']).apply(
      {'params': params['connector']}, REFERENCE['bits'])
  assert np.abs(exact - REFERENCE[f'connector_{model}']).max() > 1e-4


@pytest.mark.parity
def test_two_head_attention_splits_wqkv_and_wo_as_theirs():
  read = hf_checkpoint.Reader(hf_checkpoint.state_dict_file(STATE_DICTS['b']))
  x, x_long = REFERENCE['attention_x'], REFERENCE['attention_x_long']

  def run(num_heads, x):
    module = MultiHeadAttention(num_heads, qkv_bias=True, out_bias=True, rope=None)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    params = hf_checkpoint.place(weights.attention_sources(read, 'attention', num_heads),
                                 abstract['params'])
    return module.apply({'params': params}, x)

  np.testing.assert_allclose(run(2, x), REFERENCE['attention_out'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(run(2, x_long), REFERENCE['attention_out_long'], atol=1e-5, rtol=0)
  assert np.abs(run(1, x) - REFERENCE['attention_out']).max() > 1e-3  # the split matters


@pytest.mark.parity
@pytest.mark.parametrize('h, w, ps', [tuple(case) for case in CONFIG['pos_cases']])
def test_sincos_2d_is_their_get_2d_embed(h, w, ps):
  ours = sincos_2d(h, w, DIMS['hidden_size'], ps)
  assert ours.dtype == np.float32 and ours.shape == (h * w, DIMS['hidden_size'])
  np.testing.assert_allclose(ours, REFERENCE[f'pos_{h}x{w}_p{ps}'], atol=1e-5, rtol=0)


def test_sincos_2d_refuses_partial_patches_and_odd_widths():
  with pytest.raises(ValueError, match='patches'):
    sincos_2d(4, 6, 64, 4)
  with pytest.raises(ValueError, match='multiple of 4'):
    sincos_2d(4, 4, 62)


def test_released_split_files_load_the_same(tmp_path):
  """Their pipeline's vision_head.safetensors (`net.*`) and projector.safetensors (`fc1.*`,
  `fc2.*`)."""
  tensors = load_file(STATE_DICTS['a'])
  for name, prefix in (('vision_head', weights.HEAD_PREFIX),
                       ('projector', weights.CONNECTOR_PREFIX)):
    save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
              str(tmp_path / f'{name}.safetensors'))
  head = their_head('a')
  both = weights.load_mllm_heads(STATE_DICTS['a'], head, **DIMS)
  alone = {'head': weights.load_vision_head(str(tmp_path / 'vision_head.safetensors'), head,
                                            prefix='', **DIMS),
           'connector': weights.load_connector(str(tmp_path / 'projector.safetensors'),
                                               prefix='', **DIMS)}
  jax.tree.map(np.testing.assert_array_equal, alone, both)


@pytest.mark.parametrize('overrides, dims, needle', [
    (dict(num_blocks=3), {}, PREFIX + 'res_blocks.2.norm1.weight'),
    (dict(num_adaln=2), {}, PREFIX + 'ada_ln_blocks.1.weight'),
    (dict(use_swiglu=False), {}, PREFIX + 'res_blocks.0.mlp.0.weight'),
    (dict(model_dim=256), {}, PREFIX + 'input_proj.weight'),
    ({}, dict(latent_dim=8), PREFIX + 'input_proj.weight'),
    ({}, dict(hidden_size=32), PREFIX + 'cond_embed.weight'),
])
def test_a_checkpoint_that_does_not_fit_names_the_tensor(overrides, dims, needle):
  with pytest.raises(ValueError, match=needle.replace('.', r'\.')):
    weights.load_mllm_heads(STATE_DICTS['a'], their_head('a', **overrides), **{**DIMS, **dims})


def test_a_head_that_is_not_theirs_is_refused():
  head = their_head('a').clone(attention_heads=2)  # their heads are 128 channels wide
  with pytest.raises(ValueError, match='attention_heads'):
    weights.load_mllm_heads(STATE_DICTS['a'], head, **DIMS)


@pytest.mark.parametrize('key, edit', [
    (PREFIX + 'res_blocks.1.attn.wo.bias', 'drop'),
    ('embed_vision_mlp.fc2.weight', 'drop'),
    ('embed_vision_mlp.fc2.bias', 'shorten'),
    (PREFIX + 'res_blocks.0.attn.wqkv.weight', 'shorten'),  # no longer splits into q, k, v
    (PREFIX + 'final_layer.ada_ln_modulation.bias', 'shorten'),
])
def test_a_missing_or_mis_shaped_tensor_is_named(tmp_path, key, edit):
  tensors = load_file(STATE_DICTS['a'])
  if edit == 'drop':
    del tensors[key]
  else:
    tensors[key] = tensors[key][:-3]
  save_file(tensors, str(tmp_path / 'bad.safetensors'))
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    weights.load_mllm_heads(str(tmp_path / 'bad.safetensors'), their_head('a'), **DIMS)


def test_unused_head_tensors_are_named_and_other_modules_ignored(tmp_path):
  tensors = load_file(STATE_DICTS['a'])
  spare = tensors['embed_vision_mlp.fc1.bias']
  others = dict(tensors, **{'llm_model.model.norm.weight': spare,
                            'vision_encoder.encoder.conv_in.bias': spare})
  save_file(others, str(tmp_path / 'others.safetensors'))
  weights.load_mllm_heads(str(tmp_path / 'others.safetensors'), their_head('a'), **DIMS)
  extra = dict(others, **{PREFIX + 'spare.weight': spare, 'embed_vision_mlp.fc3.bias': spare})
  save_file(extra, str(tmp_path / 'extra.safetensors'))
  with pytest.raises(ValueError, match=r'not used.*embed_vision_mlp\.fc3\.bias.*spare\.weight'):
    weights.load_mllm_heads(str(tmp_path / 'extra.safetensors'), their_head('a'), **DIMS)


def test_a_file_without_their_llm_is_explained():
  with pytest.raises(ValueError, match=r'no llm_model\.\* tensors'):
    weights.convert_llm(STATE_DICTS['a'], None)


def _qwen3_tensors(rng, vocab=96, d=32, inter=48, layers=2, heads=4, kv_heads=2, k=16):
  """A random Qwen3ForCausalLM state dict under transformers' key names, and its config.json."""
  shapes = {'model.embed_tokens.weight': (vocab, d), 'model.norm.weight': (d,),
            'lm_head.weight': (vocab, d)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,),
                   p + 'self_attn.q_proj.weight': (heads * k, d),
                   p + 'self_attn.k_proj.weight': (kv_heads * k, d),
                   p + 'self_attn.v_proj.weight': (kv_heads * k, d),
                   p + 'self_attn.o_proj.weight': (d, heads * k),
                   p + 'self_attn.q_norm.weight': (k,), p + 'self_attn.k_norm.weight': (k,),
                   p + 'mlp.gate_proj.weight': (inter, d), p + 'mlp.up_proj.weight': (inter, d),
                   p + 'mlp.down_proj.weight': (d, inter)})
  config = dict(model_type='qwen3', vocab_size=vocab, hidden_size=d, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=k)
  return {key: rng.standard_normal(shape).astype(np.float32)
          for key, shape in shapes.items()}, config


def test_their_llm_converts_as_the_transformers_checkpoint(tmp_path):
  """Their MLLModel's `llm_model.*` is a Qwen3ForCausalLM's state dict: converted from their
  file it equals `load_pretrained` of the same tensors as a transformers directory."""
  llm, config_json = _qwen3_tensors(np.random.default_rng(0))
  os.makedirs(tmp_path / 'qwen3')
  with open(tmp_path / 'qwen3' / 'config.json', 'w') as f:
    json.dump(config_json, f)
  save_file(llm, str(tmp_path / 'qwen3' / 'model.safetensors'))
  _, expected = load_pretrained(str(tmp_path / 'qwen3'))
  config = hf_llm.llm_config(config_json)
  whole = {**load_file(STATE_DICTS['a']), **{weights.LLM_PREFIX + k: v for k, v in llm.items()}}
  save_file(whole, str(tmp_path / 'mllm.safetensors'))
  converted = weights.convert_llm(str(tmp_path / 'mllm.safetensors'), config)
  assert converted.model.config == config
  abstract = jax.eval_shape(lambda: converted.model.init(jax.random.key(0),
                                                         *converted.example_inputs))
  params = hf_checkpoint.place(converted.sources, abstract['params'])
  jax.tree.map(np.testing.assert_array_equal, params, expected['params'])

  del whole['llm_model.model.layers.1.mlp.up_proj.weight']
  save_file(whole, str(tmp_path / 'missing.safetensors'))
  with pytest.raises(ValueError, match=r'llm_model\..*model\.layers\.1\.mlp\.up_proj\.weight'):
    weights.convert_llm(str(tmp_path / 'missing.safetensors'), config)
