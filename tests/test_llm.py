"""The decoder LM and its sampling, without torch: masking, caching, scanning, filters.

One tiny model (GQA, q/k/v biases, Qwen3 q/k norm) with weights of std 0.5 drawn by numpy
(compiling `init` costs more than all forward passes), so logits are far from uniform and a
wrong mask or position changes them visibly. Inputs keep a few shapes so jitted functions
compile once and are shared by the tests.
"""
import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.convert import hf_llm
from unimm_jax.inference import sampling
from unimm_jax.models import llm

VOCAB = 128
CONFIG = llm.LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, qkv_bias=True, qk_norm='rms',
                       rope_theta=100.0)
ATOL = 2e-5


def _model(**changes) -> llm.LLM:
  return llm.LLM(dataclasses.replace(CONFIG, **changes))


@pytest.fixture(scope='module')
def model_and_params():
  model = _model()
  boxed = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 1), np.int32))['params']
  flat = flax.traverse_util.flatten_dict(nn.unbox(boxed))
  rng = np.random.default_rng(0)
  # Norm scales around 1 and biases around 0, but not at them, so their use is exercised.
  centre = {'scale': 1.0}
  std = {'scale': 0.3, 'bias': 0.3}
  params = {path: jnp.asarray(rng.normal(centre.get(path[-1], 0.0), std.get(path[-1], 0.5),
                                         value.shape), jnp.float32)
            for path, value in flat.items()}
  return model, boxed, flax.traverse_util.unflatten_dict(params)


@pytest.fixture(scope='module')
def forward(model_and_params):
  model, _, params = model_and_params

  @jax.jit
  def run(ids, mask=None, segment_ids=None):
    return model.apply({'params': params}, ids, attention_mask=mask, segment_ids=segment_ids)
  return run


def _ids(*shape, seed=0):
  return np.random.default_rng(seed).integers(1, VOCAB, size=shape).astype(np.int32)


def test_shapes_and_logical_axes(model_and_params, forward):
  _, boxed, _ = model_and_params
  logits = forward(_ids(2, 8))
  assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
  names = {'/'.join(k): v.names for k, v in flax.traverse_util.flatten_dict(
      boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)).items()}
  assert names['embed_tokens/embedding'] == ('vocab', 'embed')
  assert names['lm_head'] == ('embed', 'vocab')
  assert names['layers_0/self_attn/q_proj/kernel'] == ('embed', 'heads', 'kv')
  assert names['layers_0/self_attn/o_proj/kernel'] == ('heads', 'kv', 'embed')
  assert names['layers_0/mlp/down_proj/kernel'] == ('mlp', 'embed')
  assert names['layers_1/self_attn/q_norm/scale'] == ('kv',)


def test_packed_segments_equal_separate_documents(forward):
  a, b = _ids(1, 3, seed=1)[0], _ids(1, 5, seed=2)[0]
  packed = np.stack([np.concatenate([a, b]), np.concatenate([b, a])])
  segments = np.array([[0] * 3 + [1] * 5, [0] * 5 + [1] * 3])
  got = forward(packed, segment_ids=segments)
  # Right padding changes nothing before it (causal), so each document runs alone here.
  alone = forward(np.stack([np.pad(a, (0, 5)), np.pad(b, (0, 3))]))
  np.testing.assert_allclose(got[0, :3], alone[0, :3], atol=ATOL)
  np.testing.assert_allclose(got[0, 3:], alone[1, :5], atol=ATOL)
  np.testing.assert_allclose(got[1, :5], alone[1, :5], atol=ATOL)
  np.testing.assert_allclose(got[1, 5:], alone[0, :3], atol=ATOL)
  assert np.abs(got[0, 3:] - forward(packed)[0, 3:]).max() > 1e-2  # the mask matters


def test_left_padded_rows_equal_unpadded(forward):
  ids = _ids(2, 8, seed=3)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  padded = ids.copy()
  padded[1, :3] = 0
  got = forward(padded, mask)
  # Row 1 alone, right-padded instead (causal: nothing before the padding sees it).
  alone = forward(np.stack([ids[0], np.pad(ids[1, 3:], (0, 3))]))
  np.testing.assert_allclose(got[0], alone[0], atol=ATOL)
  np.testing.assert_allclose(got[1, 3:], alone[1, :5], atol=ATOL)


def test_inputs_embeds_equal_input_ids(model_and_params, forward):
  model, _, params = model_and_params
  ids = _ids(2, 8, seed=4)
  embeds = model.apply({'params': params}, ids, method='embed')
  got = jax.jit(lambda e: model.apply({'params': params}, inputs_embeds=e))(embeds)
  np.testing.assert_allclose(got, forward(ids), atol=ATOL)


def test_cached_decoding_equals_full_forward(model_and_params, forward):
  model, _, params = model_and_params
  ids = _ids(2, 8, seed=5)
  mask = np.ones_like(ids)
  mask[0, :2] = 0  # left-padded prompt row
  ids[0, :2] = 0
  full = forward(ids, mask)
  step = jax.jit(lambda i, m, c: model.apply({'params': params}, i, attention_mask=m, cache=c))
  cache = llm.init_cache(model.config, 2, 8)
  logits, cache = step(ids[:, :5], mask[:, :5], cache)
  np.testing.assert_allclose(logits[1], full[1, :5], atol=ATOL)
  np.testing.assert_allclose(logits[0, 2:], full[0, 2:5], atol=ATOL)
  for t in range(5, 8):
    logits, cache = step(ids[:, t:t + 1], mask[:, t:t + 1], cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=ATOL)
  np.testing.assert_array_equal(cache.lengths, [6, 8])
  assert int(cache.index) == 8


def _stack_layers(params, num_layers):
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[params[f'layers_{i}'] for i in range(num_layers)])
  rest = {k: v for k, v in params.items() if not k.startswith('layers_')}
  return {**rest, 'layers': stacked}


def test_scan_and_remat_equal_unrolled(model_and_params):
  model, _, params = model_and_params
  scanned = _model(scan_layers=True, remat=True)
  boxed = jax.eval_shape(scanned.init, jax.random.key(0), np.zeros((1, 1), np.int32))['params']
  assert boxed['layers']['self_attn']['q_proj']['kernel'].names == (
      'layers', 'embed', 'heads', 'kv')
  scanned_params = _stack_layers(params, CONFIG.num_layers)
  ids = _ids(2, 8, seed=6)

  def loss(m):
    return lambda p: jnp.sum(jnp.tanh(m.apply({'params': p}, ids)))
  want, want_grad = jax.jit(jax.value_and_grad(loss(model)))(params)
  got, got_grad = jax.jit(jax.value_and_grad(loss(scanned)))(scanned_params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4),
               got_grad, _stack_layers(want_grad, CONFIG.num_layers))


def test_bfloat16_compute_with_float32_params(model_and_params, forward):
  _, _, params = model_and_params
  model = _model(dtype=jnp.bfloat16)
  ids = _ids(2, 8, seed=7)
  got = jax.jit(lambda p: model.apply({'params': p}, ids))(params)
  assert got.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got)))
  assert np.corrcoef(np.ravel(got), np.ravel(forward(ids)))[0, 1] > 0.99
  # The cache holds bf16 keys and values; a prefill through it gives the same logits.
  cache = llm.init_cache(model.config, 2, 8)
  assert cache.keys.dtype == jnp.bfloat16
  cached, _ = jax.jit(lambda p, c: model.apply({'params': p}, ids, cache=c))(params, cache)
  np.testing.assert_allclose(cached, got, atol=0.05)


# ----------------------------------------------------------------------------- sampling


def _np_top_k(logits, k):
  out = np.full_like(logits, -np.inf)
  for row, x in enumerate(logits):
    keep = np.argsort(-x)[:k]
    out[row, keep] = x[keep]
  return out


def _np_top_p(logits, p):
  out = np.full_like(logits, -np.inf)
  for row, x in enumerate(logits):
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    total = 0.0
    for i in np.argsort(-x):
      out[row, i] = x[i]
      total += probs[i]
      if total >= p:
        break
  return out


@pytest.mark.parametrize('k', [1, 3, 10, 200])
def test_top_k_matches_numpy(k):
  logits = np.random.default_rng(k).normal(size=(4, 50)).astype(np.float32) * 3
  np.testing.assert_array_equal(sampling.top_k_filter(jnp.asarray(logits), k),
                                _np_top_k(logits, min(k, 50)))


@pytest.mark.parametrize('p', [0.0, 0.1, 0.5, 0.9])
def test_top_p_matches_numpy_and_keeps_one(p):
  logits = np.random.default_rng(1).normal(size=(4, 50)).astype(np.float32) * 3
  logits[0, 7] = 40.0  # one token with almost all the mass
  got = np.asarray(sampling.top_p_filter(jnp.asarray(logits), p))
  np.testing.assert_array_equal(got, _np_top_p(logits, p))
  assert np.isfinite(got[0]).sum() == 1
  # p = 1 keeps every token, even those whose mass float32 cannot resolve next to row 0's.
  np.testing.assert_array_equal(sampling.top_p_filter(jnp.asarray(logits), 1.0), logits)


def test_cfg_combine_formula():
  cond, uncond = jnp.array([[1.0, 4.0, -2.0]]), jnp.array([[0.5, 1.0, 3.0]])
  np.testing.assert_allclose(sampling.cfg_combine(cond, uncond, 3.0), [[2.0, 10.0, -12.0]])
  np.testing.assert_allclose(sampling.cfg_combine(cond, uncond, 1.0), cond)


PROMPT, NEW = 3, 5  # prompt + new tokens = 8, the shape `forward` is compiled for


@pytest.fixture(scope='module')
def prompts():
  ids = _ids(2, PROMPT, seed=8)
  mask = np.ones_like(ids)
  ids[1, :1], mask[1, :1] = 0, 0
  return ids, mask


def _greedy_reference(forward, ids, mask):
  """Greedy continuation by the full forward pass (no cache) over a growing sequence.

  The sequence lives in a buffer of the final length; the still-empty tail cannot change the
  logits before it (causal), so one compiled shape serves every step.
  """
  buf = np.pad(ids, ((0, 0), (0, NEW)))
  buf_mask = np.pad(mask, ((0, 0), (0, NEW)), constant_values=1)
  for t in range(PROMPT, PROMPT + NEW):
    buf[:, t] = np.argmax(forward(buf, buf_mask)[:, t - 1], axis=-1)
  return buf[:, PROMPT:]


def test_greedy_generate_equals_full_forward_and_stops_at_eos(model_and_params, forward,
                                                              prompts):
  model, _, params = model_and_params
  ids, mask = prompts
  want = _greedy_reference(forward, ids, mask)
  got = np.asarray(sampling.generate(model, params, ids, NEW, attention_mask=mask))
  np.testing.assert_array_equal(got, want)
  assert len(set(want[0])) > 2  # the test model does not just repeat one token

  eos = int(want[0, 2])
  first = int(np.argmax(want[0] == eos))
  got = np.asarray(sampling.generate(model, params, ids, NEW, eos_ids=(eos,), pad_id=-1,
                                     attention_mask=mask))
  np.testing.assert_array_equal(got[0, :first + 1], want[0, :first + 1])
  assert (got[0, first + 1:] == -1).all()
  # When every row has finished, the rest is padding for all rows (the loop has stopped).
  got = np.asarray(sampling.generate(model, params, ids, NEW, eos_ids=tuple(want[:, 0]),
                                     attention_mask=mask))
  np.testing.assert_array_equal(got[:, 0], want[:, 0])
  assert (got[:, 1:] == want[0, 0]).all()


def test_sampling_with_top_k_1_is_greedy(model_and_params, prompts):
  model, _, params = model_and_params
  ids, mask = prompts
  greedy = sampling.generate(model, params, ids, NEW, attention_mask=mask)
  sampled = sampling.generate(model, params, ids, NEW, temperature=0.7, top_k=1, top_p=0.9,
                              rng=jax.random.key(3), attention_mask=mask)
  np.testing.assert_array_equal(sampled, greedy)
  with pytest.raises(ValueError, match='rng'):
    sampling.generate(model, params, ids, NEW, temperature=0.7, attention_mask=mask)


def test_cfg_generation_reduces_to_each_stream(model_and_params, forward, prompts):
  model, _, params = model_and_params
  cond, cond_mask = prompts
  uncond, uncond_mask = _ids(2, PROMPT, seed=9), np.ones((2, PROMPT), np.int32)
  uncond[0, :2], uncond_mask[0, :2] = 0, 0

  def cfg(scale):
    return np.asarray(sampling.generate_cfg(model, params, cond, uncond, NEW, scale,
                                            attention_mask=cond_mask,
                                            uncond_attention_mask=uncond_mask))
  # scale 1 is the conditional stream alone; scale 0 the unconditional one.
  np.testing.assert_array_equal(cfg(1.0), _greedy_reference(forward, cond, cond_mask))
  np.testing.assert_array_equal(cfg(0.0), _greedy_reference(forward, uncond, uncond_mask))
  assert (cfg(4.0) != cfg(1.0)).any()


def test_hf_config_reading():
  # transformers 4 layout (Llama 3.1 on the Hub): rope_theta and rope_scaling at top level.
  llama = dict(model_type='llama', vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, rope_theta=500000.0,
               max_position_embeddings=131072,
               rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192))
  c = hf_llm.llm_config(llama)
  assert (c.rope_theta, c.rope_scaling) == (500000.0, llm.RopeScaling('llama3', 8.0, 1.0, 4.0,
                                                                      8192))
  assert (c.num_kv_heads, c.head_dim, c.qkv_bias, c.qk_norm) == (4, 16, False, None)
  c = hf_llm.llm_config({**llama, 'rope_scaling': {'type': 'linear', 'factor': 2.0}})
  assert c.rope_scaling == llm.RopeScaling('linear', 2.0)
  qwen2 = hf_llm.llm_config({**llama, 'model_type': 'qwen2', 'rope_scaling': None})
  assert (qwen2.qkv_bias, qwen2.out_bias, qwen2.rope_scaling) == (True, False, None)
  assert hf_llm.llm_config(llama, scan_layers=True).scan_layers
  with pytest.raises(ValueError, match='scan_layer'):
    hf_llm.llm_config(llama, scan_layer=True)
  with pytest.raises(ValueError, match='dynamic'):
    hf_llm.llm_config({**llama, 'rope_scaling': {'rope_type': 'dynamic', 'factor': 2.0}})
  with pytest.raises(ValueError, match='num_hidden_layers'):
    hf_llm.llm_config({k: v for k, v in llama.items() if k != 'num_hidden_layers'})
