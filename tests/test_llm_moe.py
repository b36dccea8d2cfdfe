"""The mixture-of-experts LLM and the Bailing MoE (Ling) import, against the authors' model.

The fixture (tests/fixtures/make_bailing_moe_fixture.py) is a tiny random
BailingMoeForCausalLM built by their modeling file: 3 layers (layer 0 dense, 1-2 MoE), 8
experts, top-2, 2 shared experts, three routers (multi_gate), q/k/v and output biases.
"""
import json
import os
import subprocess
import sys
import textwrap

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO
from unimm_jax.convert import hf_llm, load_pretrained
from unimm_jax.models import llm
from unimm_jax.nn import moe

FIXTURE_DIR = os.path.join(REPO, 'tests', 'fixtures', 'bailing_moe_tiny')
REFERENCE = os.path.join(REPO, 'tests', 'fixtures', 'bailing_moe_tiny_reference.npz')
MOE_LAYERS = (1, 2)
parity = pytest.mark.parity


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(REFERENCE))


def _gate_ids(ref):
  """Their image / audio masks as our router ids (0 text, 1 image, 2 audio)."""
  return (ref['image_mask'].astype(np.int32) + 2 * ref['audio_mask'].astype(np.int32))


def _apply(model, variables, ids, **kwargs):
  with jax.default_matmul_precision('highest'):
    return jax.jit(lambda v, i, **kw: model.apply(v, i, **kw))(variables, ids, **kwargs)


def _closed_form_balance(router_logits, topk, num_experts):
  """E * sum_e f_e P_e per layer (numpy), f the share of routed slots, P the mean prob."""
  probs = np.exp(router_logits - router_logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  losses, loads = [], []
  for p, idx in zip(probs, topk):
    load = np.bincount(idx.reshape(-1), minlength=num_experts) / idx.size
    losses.append(num_experts * np.sum(load * p.reshape(-1, num_experts).mean(0)))
    loads.append(load)
  return float(np.mean(losses)), np.stack(loads)


@parity
@pytest.mark.parametrize('scan, dispatch', [(False, 'dense'), (True, 'ragged')])
def test_logits_match_their_model(reference, scan, dispatch):
  model, variables = load_pretrained(FIXTURE_DIR, scan_layers=scan, moe_dispatch=dispatch)
  c = model.config
  assert (c.num_experts, c.num_experts_per_tok, c.num_shared_experts, c.first_k_dense_replace,
          c.num_routers, c.head_dim, c.qkv_bias, c.out_bias) == (8, 2, 2, 1, 3, 16, True, True)
  ids = reference['input_ids']
  text = _apply(model, variables, ids)
  np.testing.assert_allclose(text, reference['logits_text'], atol=1e-4, rtol=1e-4)
  multi = _apply(model, variables, ids, gate_ids=_gate_ids(reference))
  np.testing.assert_allclose(multi, reference['logits_multi'], atol=1e-4, rtol=1e-4)
  assert np.abs(multi - text).max() > 0.1  # the image and audio routers changed the result


@parity
@pytest.mark.parametrize('run', ['text', 'multi'])
def test_routing_and_balance_loss_match_their_routers(reference, run):
  """Our router logits and top-2 choices are theirs; our balance loss is the closed form on
  their routers' logits and choices (their code computes none)."""
  model, variables = load_pretrained(FIXTURE_DIR)
  gate_ids = _gate_ids(reference) if run == 'multi' else None
  with jax.default_matmul_precision('highest'):
    _, state = model.apply(variables, reference['input_ids'], gate_ids=gate_ids,
                           capture_intermediates=True, mutable=['intermediates'])
  theirs, their_topk = reference[f'router_logits_{run}'], reference[f'topk_{run}']
  assert reference['min_topk_gap'] > 1e-5
  for n, layer in enumerate(MOE_LAYERS):
    mlp = state['intermediates'][f'layers_{layer}']['mlp']
    routers = [mlp[name]['__call__'][0] for name in moe.ROUTER_NAMES]
    ids = np.zeros(reference['input_ids'].shape, np.int32) if gate_ids is None else gate_ids
    ours = np.choose(ids[..., None], routers)
    np.testing.assert_allclose(ours, theirs[n], atol=1e-4, rtol=1e-4)
    _, _, top = moe.route(jnp.asarray(ours), 2, True)
    np.testing.assert_array_equal(top, their_topk[n])
  stats = llm.moe_stats(state)
  loss, load = _closed_form_balance(theirs, their_topk, 8)
  np.testing.assert_allclose(stats['router_aux_loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(stats['expert_load'], load, atol=1e-6)


@parity
def test_norm_head_matches_their_normalised_head(reference):
  model, variables = load_pretrained(FIXTURE_DIR, norm_head=True)
  np.testing.assert_allclose(_apply(model, variables, reference['input_ids']),
                             reference['logits_norm_head'], atol=1e-4, rtol=1e-4)


def _copy_checkpoint(dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst)
  with open(os.path.join(FIXTURE_DIR, 'config.json')) as f:
    config = json.load(f)
  tensors = load_file(os.path.join(FIXTURE_DIR, 'model.safetensors'))
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  save_file(tensors, os.path.join(dst, 'model.safetensors'))
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(config, f)
  return dst


@parity
def test_single_router_layout_imports(reference, tmp_path):
  """Ling's own layout (multi_gate false: no image_gate / audio_gate) gives the text logits."""
  def drop_gates(tensors):
    for key in [k for k in tensors if k.endswith(('.image_gate.weight', '.audio_gate.weight'))]:
      del tensors[key]
  path = _copy_checkpoint(str(tmp_path / 'ling'), drop_gates,
                          lambda config: config.update(multi_gate=False))
  model, variables = load_pretrained(path)
  assert model.config.num_routers == 1
  np.testing.assert_allclose(_apply(model, variables, reference['input_ids']),
                             reference['logits_text'], atol=1e-4, rtol=1e-4)
  # The full layout with multi_gate off: the two extra routers are named as unused.
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.audio_gate\.weight'):
    load_pretrained(_copy_checkpoint(str(tmp_path / 'extra'),
                                     edit_config=lambda config: config.update(multi_gate=False)))


@pytest.mark.parametrize('key, shape, scan', [
    ('model.layers.2.mlp.experts.5.up_proj.weight', (33, 64), False),
    ('model.layers.2.mlp.experts.5.up_proj.weight', (33, 64), True),
    ('model.layers.1.attention.query_key_value.weight', (120, 64), False),
    ('model.layers.1.mlp.shared_experts.down_proj.weight', (64, 32), True),
    ('model.layers.0.mlp.gate_proj.weight', (97, 64), False),
])
def test_wrong_tensor_shape_names_the_tensor(tmp_path, key, shape, scan):
  def edit(tensors):
    tensors[key] = np.zeros(shape, np.float16)
  path = _copy_checkpoint(str(tmp_path / 'bad'), edit)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    load_pretrained(path, scan_layers=scan)


def test_missing_expert_is_named(tmp_path):
  def drop(tensors):
    del tensors['model.layers.1.mlp.experts.7.down_proj.weight']
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.experts\.7\.down_proj\.weight'):
    load_pretrained(_copy_checkpoint(str(tmp_path / 'missing'), drop))


# Ling-lite / Ming-UniVision's llm_config (their config.json; the keys the import reads).
LING_LITE = dict(
    model_type='bailing_moe', vocab_size=126464, hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
    num_experts=64, num_experts_per_tok=6, num_shared_experts=2, moe_intermediate_size=1408,
    first_k_dense_replace=0, norm_topk_prob=True, multi_gate=True, norm_head=False,
    rope_scaling={'type': '3D', 'factor': None}, rope_theta=600000, rms_norm_eps=1e-05,
    use_bias=False, use_qkv_bias=False, tie_word_embeddings=False, hidden_act='silu',
    use_sliding_window=False)


def test_ling_lite_config_and_size():
  """Ling-lite's config maps onto LLMConfig; scanned, its 16.8B parameters (as published)."""
  c = hf_llm.llm_config(LING_LITE, scan_layers=True)
  assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.num_shared_experts,
          c.num_routers, c.num_kv_heads, c.head_dim, c.rope_scaling) == (
              64, 6, 1408, 2, 3, 4, 128, None)
  assert llm.num_dense_prefix(c) == 0
  shapes = jax.eval_shape(lambda: llm.LLM(c).init(jax.random.key(0),
                                                   jnp.zeros((1, 1), jnp.int32)))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes['params']), sep='/')
  assert flat['layers/mlp/experts/gate_proj'].value.shape == (28, 64, 2048, 1408)
  assert flat['layers/mlp/experts/gate_proj'].names == ('layers', 'expert', 'embed', 'mlp')
  total = sum(np.prod(p.value.shape) for p in flat.values())
  assert 16.7e9 < total < 16.9e9, total
  for change, message in [(dict(rope_scaling={'type': 'yarn', 'factor': 2.0}), 'yarn'),
                          (dict(moe_intermediate_size=None), 'moe_intermediate_size'),
                          (dict(first_k_dense_replace=1, intermediate_size=None),
                           'intermediate_size')]:
    with pytest.raises(ValueError, match=message):
      hf_llm.llm_config(dict(LING_LITE, **change))


def _tiny_moe(**fields):
  return llm.LLMConfig(**{**dict(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
      num_kv_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
      num_shared_experts=1, first_k_dense_replace=1, initializer_range=0.5), **fields})


def test_balance_loss_closed_forms():
  # A uniform router: P_e = 1/E and the loads sum to 1, so the loss is exactly 1.
  probs = jnp.full((2, 5, 4), 0.25)
  idx = jnp.asarray(np.random.default_rng(0).integers(0, 4, (2, 5, 2)))
  np.testing.assert_allclose(moe.balance_loss(probs, idx).balance_loss, 1.0, rtol=1e-6)
  # Every token on experts 0 and 1 with probability 1/2 each: E * (1/2 * 1/2) * 2 = E / 2.
  probs = jnp.zeros((3, 4)).at[:, :2].set(0.5)
  idx = jnp.tile(jnp.array([[0, 1]]), (3, 1))
  np.testing.assert_allclose(moe.balance_loss(probs, idx).balance_loss, 2.0, rtol=1e-6)
  # Masked tokens do not count: the same as the loss of the kept tokens alone.
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 6, 4)).astype(np.float32)
  mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], bool)
  p, _, top = moe.route(jnp.asarray(logits), 2, True)
  masked = moe.balance_loss(p, top, jnp.asarray(mask))
  kept = moe.balance_loss(p[mask], top[mask])
  np.testing.assert_allclose(masked.balance_loss, kept.balance_loss, rtol=1e-6)
  np.testing.assert_allclose(masked.expert_load, kept.expert_load, rtol=1e-6)


def test_train_step_gradients_are_finite():
  """A jitted CE + balance-loss step on the imported model (scanned layers, the ragged
  dispatch): finite gradients that reach every router and expert kernel."""
  model, variables = load_pretrained(FIXTURE_DIR, scan_layers=True, moe_dispatch='ragged')
  ids = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)

  def loss_fn(params):
    logits, state = model.apply({'params': params}, ids, gate_ids=ids % 3,
                                mutable='intermediates')
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None],
                                       axis=-1))
    return ce + 0.01 * llm.moe_stats(state)['router_aux_loss']

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert np.isfinite(loss)
  flat = flax.traverse_util.flatten_dict(grads, sep='/')
  assert all(np.isfinite(g).all() for g in flat.values())
  routed = [k for k in flat if k.startswith('layers/mlp/') and 'shared' not in k]
  assert len(routed) == 6, routed  # 3 routers, 3 expert kernels
  assert all(np.abs(flat[k]).max() > 0 for k in routed)


def test_dispatches_agree_in_values_and_gradients():
  """'dense' and 'ragged' compute the same outputs, balance loss and gradients."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 16)).astype(np.float32)
  gate_ids = rng.integers(0, 2, (2, 7))
  make = lambda dispatch: moe.MoEFeedForward(6, 3, 8, num_shared_experts=1, num_routers=2,
                                             dispatch=dispatch, kernel_stddev=0.5)
  shapes = nn.unbox(jax.eval_shape(make('dense').init, jax.random.key(0), x)['params'])
  params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32), shapes)

  def run(dispatch):
    def loss(params, x):
      y, aux = make(dispatch).apply({'params': params}, x, gate_ids=gate_ids)
      return jnp.sum(jnp.sin(y)) + aux.balance_loss, (y, aux)
    with jax.default_matmul_precision('highest'):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  (loss_a, (y_a, aux_a)), grads_a = run('dense')
  (loss_b, (y_b, aux_b)), grads_b = run('ragged')
  np.testing.assert_allclose(y_a, y_b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux_a.balance_loss, aux_b.balance_loss, rtol=1e-6)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               grads_a, grads_b)


def test_config_checks_and_dense_models_unchanged():
  with pytest.raises(ValueError, match='num_experts_per_tok'):
    _tiny_moe(num_experts_per_tok=5)
  with pytest.raises(ValueError, match='moe_dispatch'):
    _tiny_moe(moe_dispatch='sparse')
  with pytest.raises(ValueError, match='norm_head'):
    _tiny_moe(norm_head=True, tie_word_embeddings=True)
  dense = llm.LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, scan_layers=True)
  ids = jnp.zeros((1, 4), jnp.int32)
  # Shapes only (jax.eval_shape): nothing here needs values.
  init = lambda c: jax.eval_shape(llm.LLM(c).init, jax.random.key(0), ids)
  variables = init(dense)
  assert set(variables['params']) == {'embed_tokens', 'layers', 'norm', 'lm_head'}
  _, state = jax.eval_shape(lambda v: llm.LLM(dense).apply(v, ids, mutable='intermediates'),
                            variables)
  assert llm.moe_stats(state) == {}
  # With scan, an MoE model's dense prefix is a scan of its own.
  params = nn.unbox(init(_tiny_moe(scan_layers=True))['params'])
  assert set(params) == {'embed_tokens', 'dense_layers', 'layers', 'norm', 'lm_head'}
  assert params['dense_layers']['mlp']['up_proj']['kernel'].shape == (1, 32, 48)
  assert params['layers']['mlp']['experts']['up_proj'].shape == (2, 4, 32, 16)


_SHARDED = textwrap.dedent('''
    import json, sys
    import flax.linen as nn
    import jax, numpy as np
    from unimm_jax.convert import load_pretrained
    from unimm_jax.models import llm
    from unimm_jax.parallel import rule_sets

    path, reference = sys.argv[1], np.load(sys.argv[2])
    rows = np.arange(8) % 3  # 8 rows, so every batch split divides them
    ids = reference['input_ids'][rows]
    gate_ids = (reference['image_mask'] + 2 * reference['audio_mask'].astype(np.int32))[rows]
    expected = reference['logits_multi'][rows]

    def run(model, variables):
      fn = jax.jit(lambda v: model.apply(v, ids, gate_ids=gate_ids, mutable='intermediates'))
      with jax.default_matmul_precision('highest'):
        logits, state = fn(variables)
      return np.asarray(logits), float(llm.moe_stats(state)['router_aux_loss'])

    plain_logits, plain_aux = run(*load_pretrained(path))
    for name, sizes, dispatch in [('tensor', (2, 1, 4), 'dense'), ('fsdp', (2, 4, 1), 'ragged'),
                                  ('fsdp_tensor', (2, 2, 2), 'dense')]:
      mesh = jax.make_mesh(sizes, ('data', 'fsdp', 'tensor'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
      rules = rule_sets.RULE_SETS[name]
      model, variables = load_pretrained(path, mesh=mesh, rules=rules, moe_dispatch=dispatch)
      experts = variables['params']['layers_1']['mlp']['experts']['gate_proj']  # (8, 64, 32)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits, aux = run(model, variables)
      print(json.dumps(dict(name=name, shard=list(experts.addressable_shards[0].data.shape),
                            logits=float(np.abs(logits - expected).max()),
                            plain=float(np.abs(logits - plain_logits).max()),
                            aux=abs(aux - plain_aux))))
''')


@parity
def test_experts_sharded_on_8_devices_give_the_same_logits():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _SHARDED, FIXTURE_DIR, REFERENCE], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = {r['name']: r for r in map(json.loads, proc.stdout.strip().splitlines())}
  # The expert axis splits over tensor (4 or 2 ways) or fsdp (4 ways).
  assert results['tensor']['shard'] == [2, 64, 32]
  assert results['fsdp']['shard'] == [2, 64, 32]
  assert results['fsdp_tensor']['shard'] == [4, 32, 32]
  for r in results.values():
    assert r['logits'] < 1e-4 and r['plain'] < 1e-4 and r['aux'] < 1e-5, r
