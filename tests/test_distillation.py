"""Pre-Post Distillation: the semantic heads and the cosine losses against closed forms."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.losses.distillation import cosine_distillation_loss, pre_post_distillation
from unimm_jax.models.distillation_heads import PrePostHeads, SemanticHead

B, H, W, C, OUT = 2, 3, 4, 8, 16


def _tokens(shape=(B, H, W, C), seed=0):
  # numpy inputs: each eager jax op on a new shape is one more XLA compile.
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _key(seed=1):
  # 'rbg' keys: an init full of threefry hashes takes CPU XLA much longer to compile.
  return jax.random.key(seed, impl='rbg')


def _abs_sum(tree) -> float:
  return sum(float(np.abs(x).sum()) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def heads():
  """kind -> (jitted apply, variables); a head's parameters do not depend on b or n."""
  built = {}
  for kind in ('linear', 'attention'):
    module = SemanticHead(kind, OUT, num_heads=4)
    built[kind] = jax.jit(module.apply), jax.jit(module.init)(_key(), _tokens())
  return built


KINDS = pytest.mark.parametrize('kind', ['linear', 'attention'])


@KINDS
def test_head_output_shape_logical_names_and_flattening(heads, kind):
  apply, variables = heads[kind]
  tokens = _tokens()
  out = apply(variables, tokens)
  assert out.shape == (B, OUT) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  # (b, h, w, c) is pooled as the row-major sequence (b, h * w, c).
  np.testing.assert_allclose(apply(variables, tokens.reshape(B, H * W, C)), out, rtol=1e-6,
                             atol=1e-6)
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(p, nn.Partitioned) for p in leaves)


@KINDS
def test_heads_are_invariant_to_token_order(heads, kind):
  apply, variables = heads[kind]
  tokens = _tokens().reshape(B, H * W, C)
  order = np.random.default_rng(3).permutation(H * W)
  np.testing.assert_allclose(apply(variables, tokens[:, order]), apply(variables, tokens),
                             rtol=1e-5, atol=1e-5)


@KINDS
def test_heads_ignore_masked_tokens(heads, kind):
  apply, variables = heads[kind]
  tokens = _tokens().reshape(B, H * W, C)
  mask = np.arange(H * W)[None, :] < np.array([[4], [7]])
  out = apply(variables, tokens, mask)
  garbage = np.where(mask[..., None], tokens, 1e3 * _tokens((B, H * W, C), seed=5))
  np.testing.assert_allclose(apply(variables, garbage, mask), out, rtol=1e-5, atol=1e-5)
  # The same as giving the head only the kept tokens (parameters do not depend on n).
  np.testing.assert_allclose(apply(variables, tokens[1:, :7])[0], out[1], rtol=1e-5, atol=1e-5)


def test_linear_head_is_mean_then_dense(heads):
  apply, variables = heads['linear']
  tokens = _tokens()
  p = nn.unbox(variables)['params']['proj']
  expected = tokens.reshape(B, -1, C).mean(axis=1) @ p['kernel'] + p['bias']
  np.testing.assert_allclose(apply(variables, tokens), expected, rtol=1e-5, atol=1e-6)
  # A key mask makes it the mean over the kept tokens only.
  mask = np.arange(H * W).reshape(1, H, W) < np.array([5, 12])[:, None, None]
  kept = [tokens[i].reshape(-1, C)[:n].mean(axis=0) for i, n in enumerate([5, 12])]
  np.testing.assert_allclose(apply(variables, tokens, mask),
                             np.stack(kept) @ p['kernel'] + p['bias'], rtol=1e-5, atol=1e-6)


def test_attention_head_parameter_shapes():
  def shapes(module):
    abstract = jax.eval_shape(module.init, _key(), _tokens())
    return jax.tree.map(lambda x: x.shape, nn.unbox(abstract)['params'])

  no_mlp = shapes(SemanticHead('attention', OUT, num_heads=2, width=6, mlp_ratio=0))
  assert 'fc1' not in no_mlp and 'mlp_norm' not in no_mlp
  assert no_mlp['in_proj']['kernel'] == (C, 6) and no_mlp['probe'] == (1, 6)
  assert no_mlp['attention']['query'] == (6, 2, 3)
  assert no_mlp['out_proj']['kernel'] == (6, OUT)
  assert shapes(SemanticHead('attention', OUT, num_heads=2, width=6))['fc1']['kernel'] == (6, 24)
  default = shapes(SemanticHead('attention', OUT, num_heads=4))  # width None -> out_dim
  assert default['in_proj']['kernel'] == (C, OUT)
  assert shapes(SemanticHead('linear', OUT)) == {'proj': {'kernel': (C, OUT), 'bias': (OUT,)}}


def test_head_errors():
  tokens = _tokens()

  def init(module, x=tokens, mask=None):
    return jax.eval_shape(module.init, _key(), x, mask)

  with pytest.raises(ValueError, match="kind='mean' is not one of"):
    init(SemanticHead('mean', OUT))
  with pytest.raises(ValueError, match='width 16 is not divisible by num_heads=3'):
    init(SemanticHead('attention', OUT, num_heads=3))
  with pytest.raises(ValueError, match=r'must be \(b, h, w, c\) or \(b, n, c\)'):
    init(SemanticHead('linear', OUT), tokens[0, 0])
  with pytest.raises(ValueError, match='key_mask shape'):
    init(SemanticHead('linear', OUT), tokens, np.ones((B, H * W), bool))


def test_pre_post_heads_are_separate_and_switchable():
  u_g = np.tanh(_tokens())
  u_q = np.where(u_g > 0, 1.0, -1.0).astype(np.float32)  # the value of U_Q
  teacher = _tokens((B, OUT), seed=7)
  pair = PrePostHeads('linear', OUT)
  variables = pair.init(_key(), u_g, u_q)
  assert set(variables['params']) == {'pre_head', 'post_head'}
  pre, post = pair.apply(variables, u_g, u_q)
  assert pre.shape == post.shape == (B, OUT)
  assert not np.allclose(pre, post)
  np.testing.assert_array_equal(
      pair.apply(variables, u_q, method=PrePostHeads.zero_shot_embedding), post)

  def losses(params):
    return pre_post_distillation(teacher, *pair.apply({'params': params}, u_g, u_q))

  # Each term trains its own head only.
  grads = jax.jit(jax.jacrev(losses))(variables['params'])
  assert _abs_sum(grads['pre_distill']['post_head']) == 0.0
  assert _abs_sum(grads['pre_distill']['pre_head']) > 0.0
  assert _abs_sum(grads['post_distill']['pre_head']) == 0.0
  assert _abs_sum(grads['post_distill']['post_head']) > 0.0

  # Switched-off heads have no parameters and give None (shapes only: nothing to compute).
  post_only = PrePostHeads('linear', OUT, pre=False)
  variables = jax.eval_shape(post_only.init, _key(), u_g, u_q)
  assert set(variables['params']) == {'post_head'}
  pre, post = jax.eval_shape(post_only.apply, variables, u_g, u_q)
  assert pre is None and post.shape == (B, OUT)
  pre_only = PrePostHeads('linear', OUT, post=False)
  variables = pre_only.init(_key(), u_g, u_q)
  assert set(variables['params']) == {'pre_head'}
  # Without a post head the discrete tokens are embedded by the pre head.
  np.testing.assert_array_equal(
      pre_only.apply(variables, u_q, method=PrePostHeads.zero_shot_embedding),
      pre_only.apply(variables, u_q, u_q)[0])
  with pytest.raises(ValueError, match='both off'):
    jax.eval_shape(PrePostHeads('linear', OUT, pre=False, post=False).init, _key(), u_g, u_q)


def test_cosine_loss_closed_forms():
  loss = jax.jit(cosine_distillation_loss)
  x = np.array([[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]])
  np.testing.assert_allclose(loss(x, x), 0.0, atol=1e-6)
  np.testing.assert_allclose(loss(x, 7.0 * x), 0.0, atol=1e-6)
  np.testing.assert_allclose(loss(x, -x), 2.0, atol=1e-6)
  np.testing.assert_allclose(loss(x, np.array([[2.0, -1.0, 0.0], [0.0, 3.0, 0.0]])), 1.0,
                             atol=1e-6)
  # The mean over the batch of per-row 1 - cos: rows with cos 1 and cos -1 give 1.
  np.testing.assert_allclose(loss(x, x * np.array([[1.0], [-1.0]])), 1.0, atol=1e-6)
  low = loss(x.astype(jnp.bfloat16), x)
  assert low.dtype == jnp.float32 and low.shape == ()
  with pytest.raises(ValueError, match='out_dim must equal the teacher width'):
    cosine_distillation_loss(x, x[:, :2])


def test_cosine_loss_gradient_reaches_student_only():
  student, teacher = _tokens((4, 6)), _tokens((4, 6), seed=1)
  grads = jax.jit(jax.grad(cosine_distillation_loss, argnums=(0, 1)))
  g_student, g_teacher = grads(student, teacher)
  np.testing.assert_array_equal(g_teacher, 0.0)
  # d/ds (1 - cos) = -(t_hat - cos s_hat) / |s| per row, over the batch mean of 4 rows.
  s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  s_norm = np.linalg.norm(s, axis=1, keepdims=True)
  s_hat, t_hat = s / s_norm, t / np.linalg.norm(t, axis=1, keepdims=True)
  cos = np.sum(s_hat * t_hat, axis=1, keepdims=True)
  np.testing.assert_allclose(g_student, -(t_hat - cos * s_hat) / s_norm / 4, rtol=1e-4,
                             atol=1e-6)
  # Zero vectors: cosine 0 (loss 1) and finite gradients.
  zero = np.zeros_like(student)
  for a, b in [(zero, teacher), (student, zero), (zero, zero)]:
    np.testing.assert_allclose(jax.jit(cosine_distillation_loss)(a, b), 1.0, atol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in grads(a, b))


def test_pre_post_distillation_terms():
  teacher = np.array([[1.0, 0.0], [0.0, 1.0]])
  pre = np.array([[1.0, 0.0], [1.0, 0.0]])  # cos 1 and 0 -> L_pre = 0.5
  post = np.array([[-1.0, 0.0], [0.0, 2.0]])  # cos -1 and 1 -> L_post = 1
  terms = pre_post_distillation(teacher, pre, post, eta=0.5)
  np.testing.assert_allclose([terms['pre_distill'], terms['post_distill'], terms['ppd']],
                             [0.5, 1.0, 1.0], atol=1e-6)
  only_post = pre_post_distillation(teacher, None, post, eta=2.0)
  assert set(only_post) == {'post_distill', 'ppd'}
  np.testing.assert_allclose(only_post['ppd'], 2.0, atol=1e-6)
  only_pre = pre_post_distillation(teacher, pre, None)
  assert set(only_pre) == {'pre_distill', 'ppd'}
  np.testing.assert_allclose(only_pre['ppd'], 0.5, atol=1e-6)
  with pytest.raises(ValueError, match='both None'):
    pre_post_distillation(teacher, None, None)
  with pytest.raises(ValueError, match='must be pooled'):
    pre_post_distillation(teacher[None], pre[None], post[None])
