"""Residual VQ with EMA codebooks (EvoTok's quantizer): the greedy lookup against brute force
and against vector-quantize-pytorch's ResidualVQ, the EMA / warm-up / Laplace smoothing /
dead-code update against a numpy rewrite of the authors' update, straight-through
gradients, the commitment term, decoding codes, and the lookup's memory at full size.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.quantizers.residual_quantizer import (
    RESTART_RNG, STATE_COLLECTION, ResidualQuantizer, nearest_codes)


def greedy_reference(codebooks, x):
  """Brute-force greedy residual VQ in float64 numpy over full (n, K, d) differences.

  Returns codes (n, L), each level's residual input (L, n, d) and partial sums (L, n, d).
  """
  codebooks = np.asarray(codebooks, np.float64)
  residual = np.asarray(x, np.float64).reshape(-1, codebooks.shape[-1])
  total = np.zeros_like(residual)
  codes, residuals, partials = [], [], []
  for codebook in codebooks:
    distances = np.sum(np.square(residual[:, None, :] - codebook[None]), axis=-1)
    index = np.argmin(distances, axis=1)  # first of ties, as torch's argmin
    residuals.append(residual)
    residual = residual - codebook[index]
    total = total + codebook[index]
    codes.append(index)
    partials.append(total)
  return np.stack(codes, axis=-1), np.stack(residuals), np.stack(partials)


def train_step(quantizer):
  """Jitted training apply: (variables, x, restart key) -> (outputs, updated variables)."""
  return jax.jit(lambda variables, x, key: quantizer.apply(
      variables, x, train=True, mutable=[STATE_COLLECTION], rngs={RESTART_RNG: key}))


def init(quantizer, seed=0):
  """The quantizer's variables, created through its decoder (a smaller program to compile
  than the lookup; setup creates the same variables either way)."""
  codes = jnp.zeros((1, quantizer.num_levels), jnp.int32)
  return jax.jit(lambda key: quantizer.init(key, codes, method='codes_to_quantized'))(
      jax.random.key(seed))


def state_of(variables):
  return jax.tree.map(np.asarray, nn.meta.unbox(variables)[STATE_COLLECTION])


# ------------------------------------------------------------------------------ lookup

# (codes, chunk_size): 37 codes, which no chunk divides, in chunks of one sub-block each
# (4, 7) or one chunk (64 > 37); 300 codes in chunks of 200 -> 256: 4 sub-blocks of 64.
@pytest.mark.parametrize('codes,chunk_size', [(37, 4), (37, 7), (37, 64), (300, 200)])
def test_nearest_codes_match_brute_force(codes, chunk_size):
  rng = np.random.default_rng(0)
  codebooks = rng.normal(size=(3, codes, 5)).astype(np.float32)
  x = rng.normal(size=(2, 9, 5)).astype(np.float32)
  indices, quantized = nearest_codes(jnp.asarray(codebooks), jnp.asarray(x),
                                     chunk_size=chunk_size)
  reference, _, partials = greedy_reference(codebooks, x)
  assert indices.shape == (2, 9, 3) and indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1, 3), reference)
  np.testing.assert_allclose(np.asarray(quantized).reshape(-1, 5), partials[-1], atol=1e-5)


@pytest.mark.parametrize('chunk_size', [4, 150])  # 150: chunks of 192, three sub-blocks
def test_nearest_codes_take_the_lowest_index_of_ties(chunk_size):
  far = [[10.0 * k, -7.0 * k] for k in range(1, 201)]  # integers: the arithmetic is exact
  level0 = np.array(far, np.float32)
  level0[[2, 7]] = [1.0, 0.0]
  level0[5] = [0.0, 1.0]
  level0[[8, 9]] = [3.0, 3.0]
  level0[[70, 130, 193]] = [5.0, 5.0]  # other sub-blocks and chunks
  level1 = np.array(far, np.float32)
  level1[[1, 6, 100]] = [0.0, 0.0]
  codebooks = np.stack([level0, level1])
  # (1, 0) is rows 2 and 7; (0.5, 0.5) is as far from rows 2, 5 and 7.
  x = np.array([[1.0, 0.0], [0.5, 0.5], [3.0, 3.0], [5.0, 5.0]], np.float32)
  indices, _ = nearest_codes(jnp.asarray(codebooks), jnp.asarray(x), chunk_size=chunk_size)
  np.testing.assert_array_equal(indices[:, 0], [2, 2, 8, 70])
  np.testing.assert_array_equal(indices, greedy_reference(codebooks, x)[0])
  assert int(indices[0, 1]) == 1  # residual (0, 0): rows 1, 6 and 100 of level 1 tie


@pytest.mark.parity
def test_lookup_matches_vector_quantize_pytorch_residual_vq():
  torch = pytest.importorskip('torch')
  vqp = pytest.importorskip('vector_quantize_pytorch')
  rng = np.random.default_rng(1)
  codebooks = rng.normal(size=(4, 50, 8)).astype(np.float32)
  x = rng.normal(size=(3, 20, 8)).astype(np.float32)
  peer = vqp.ResidualVQ(dim=8, num_quantizers=4, codebook_size=50).eval()
  for layer, codebook in zip(peer.layers, codebooks):
    layer._codebook.embed.data.copy_(torch.from_numpy(codebook)[None])  # pylint: disable=protected-access
  with torch.no_grad():
    peer_quantized, peer_indices, _ = peer(torch.from_numpy(x))
  indices, quantized = nearest_codes(jnp.asarray(codebooks), jnp.asarray(x), chunk_size=16)
  np.testing.assert_array_equal(indices, peer_indices.numpy())
  np.testing.assert_allclose(quantized, peer_quantized.numpy(), atol=1e-5)


def test_lookup_memory_stays_bounded_at_full_size():
  n, codes, dim, levels = 2048, 32768, 32, 2
  compiled = jax.jit(nearest_codes).lower(
      jax.ShapeDtypeStruct((levels, codes, dim), jnp.float32),
      jax.ShapeDtypeStruct((n, dim), jnp.float32)).compile()
  memory = compiled.memory_analysis()
  assert memory is not None
  # One (n, K) distance matrix would be 256 MiB and the (n, K, d) differences 8 GiB.
  assert memory.temp_size_in_bytes < n * codes * 4 // 4, memory.temp_size_in_bytes


# ------------------------------------------------------------------------------ module

SMALL = dict(num_levels=3, codebook_size=11, code_dim=4, partial_depths=(1, 2, 3),
             vq_warmup=1, chunk_size=4)


@pytest.fixture(scope='module')
def small():
  """A tiny quantizer, its variables and its jitted forward (shared: one compile)."""
  quantizer = ResidualQuantizer(**SMALL)
  x = np.random.default_rng(2).normal(size=(2, 5, 4)).astype(np.float32)
  return quantizer, init(quantizer), jax.jit(quantizer.apply), x


def test_state_layout_and_init(small):
  quantizer, variables, _, x = small
  assert set(variables) == {STATE_COLLECTION}  # no params: codebooks are not trained by grads
  boxes = variables[STATE_COLLECTION]
  assert boxes['codebooks'].names == (None, 'codebook', None)
  assert boxes['cluster_size'].names == (None, 'codebook')
  assert boxes['embed_sum'].names == (None, 'codebook', None)
  state = state_of(variables)
  assert state['codebooks'].shape == (3, 11, 4) and state['step'] == 0
  np.testing.assert_array_equal(state['embed_sum'], state['codebooks'])
  np.testing.assert_array_equal(state['cluster_size'], np.zeros((3, 11)))
  # init with train=True does not update the state either
  trained_init = jax.jit(lambda key, v: quantizer.init(key, v, train=True))
  jax.tree.map(np.testing.assert_array_equal,
               state_of(trained_init(jax.random.key(0), jnp.asarray(x))), state)
  big = ResidualQuantizer(num_levels=2, codebook_size=4096, code_dim=8, partial_depths=(2,))
  codebooks = state_of(init(big, seed=1))['codebooks']
  assert abs(codebooks.mean()) < 0.02 and abs(codebooks.std() - 1) < 0.02  # N(0, 1)


def test_forward_outputs_straight_through_and_commitment(small):
  quantizer, variables, forward, x = small
  (q1, _, q3), codes, losses, stats = forward(variables, jnp.asarray(x))
  ref_codes, _, partials = greedy_reference(state_of(variables)['codebooks'], x)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1, 3), ref_codes)
  np.testing.assert_allclose(np.asarray(q1).reshape(-1, 4), partials[0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(q3).reshape(-1, 4), partials[2], atol=1e-5)
  flat = x.reshape(-1, 4)
  commitment = np.mean([np.mean((flat - p) ** 2) for p in partials])
  np.testing.assert_allclose(losses['commitment'], commitment, rtol=1e-5)
  np.testing.assert_allclose(stats['quantization_mse'], np.mean((flat - partials[2]) ** 2),
                             rtol=1e-5)
  used = [len(set(ref_codes[:, level])) / 11 for level in range(3)]
  np.testing.assert_allclose(stats['code_usage'], used)
  assert stats['code_perplexity'].shape == (3,) and float(stats['dead_codes_restarted']) == 0

  # Gradients: the identity for each partial sum, and
  # d commitment / dx = 2 sum_l (x - p_l) / (L n d), since it pulls x towards sg(p_l).
  weights = np.random.default_rng(3).normal(size=(3,) + x.shape).astype(np.float32)

  @jax.jit
  def gradient(v, quantized_weights, commitment_weight):
    def weighted(v):
      quantized, _, terms, _ = quantizer.apply(variables, v)
      return (jnp.sum(jnp.stack(quantized) * quantized_weights)
              + commitment_weight * terms['commitment'])
    return jax.grad(weighted)(v)

  for depth in range(3):
    one_hot = np.zeros_like(weights)
    one_hot[depth] = weights[depth]
    grad = gradient(jnp.asarray(x), jnp.asarray(one_hot), 0.0)
    np.testing.assert_allclose(grad, weights[depth], rtol=1e-6)
  grad = gradient(jnp.asarray(x), jnp.zeros(weights.shape), 1.0)
  expected = 2 * np.sum(flat[None] - partials, axis=0) / (3 * flat.size)
  np.testing.assert_allclose(np.asarray(grad).reshape(-1, 4), expected, atol=1e-6)


def test_codes_to_quantized_equals_the_forward_sums(small):
  quantizer, variables, forward, x = small
  quantized, codes, _, _ = forward(variables, jnp.asarray(x))
  _, _, partials = greedy_reference(state_of(variables)['codebooks'], x)
  for depth in (1, 2, 3):
    decoded = quantizer.apply(variables, codes, depth, method='codes_to_quantized')
    assert decoded.shape == x.shape
    np.testing.assert_allclose(decoded, quantized[depth - 1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(decoded).reshape(-1, 4), partials[depth - 1],
                               atol=1e-5)
  np.testing.assert_array_equal(  # the first m levels' codes alone decode to their sum
      quantizer.apply(variables, codes[..., :2], method='codes_to_quantized'),
      quantizer.apply(variables, codes, 2, method='codes_to_quantized'))
  with pytest.raises(ValueError):
    quantizer.apply(variables, codes[..., :2], 3, method='codes_to_quantized')


def test_state_is_untouched_outside_training_or_when_immutable(small):
  quantizer, variables, forward, x = small
  evaluate = jax.jit(lambda v, x: quantizer.apply(v, x, mutable=[STATE_COLLECTION]))
  _, updates = evaluate(variables, jnp.asarray(x))
  jax.tree.map(np.testing.assert_array_equal, state_of(updates), state_of(variables))
  # Immutable state: training runs (without the restart rng) and updates nothing.
  stats = jax.jit(lambda v, x: quantizer.apply(v, x, train=True))(variables, jnp.asarray(x))[3]
  assert float(stats['dead_codes_restarted']) == 0
  assert float(forward(variables, jnp.asarray(x))[3]['dead_codes_restarted']) == 0


def _reference_update(state, residuals, codes, decay, eps, warmup):
  """The authors' update before dead codes are restarted (numpy, float64)."""
  num_levels, num_codes = state['cluster_size'].shape
  cluster_size = np.array(state['cluster_size'], np.float64)
  embed_sum = np.array(state['embed_sum'], np.float64)
  for level in range(num_levels):
    counts = np.bincount(codes[:, level], minlength=num_codes)
    sums = np.zeros_like(embed_sum[level])
    np.add.at(sums, codes[:, level], residuals[level])
    cluster_size[level] = decay * cluster_size[level] + (1 - decay) * counts
    if state['step'] >= warmup:
      embed_sum[level] = decay * embed_sum[level] + (1 - decay) * sums
  return cluster_size, embed_sum


def _smoothed_sizes(cluster_size, eps):
  """Laplace-smoothed cluster sizes N (c + eps) / (N + K eps), N = sum of c, before the clamp."""
  total = cluster_size.sum(axis=1, keepdims=True)
  return total * (cluster_size + eps) / (total + cluster_size.shape[1] * eps)


def _laplace_codebooks(cluster_size, embed_sum, eps):
  return embed_sum / np.maximum(_smoothed_sizes(cluster_size, eps), 1.0)[..., None]


def test_defaults_are_the_authors_settings():
  quantizer = ResidualQuantizer()
  assert (quantizer.num_levels, quantizer.codebook_size, quantizer.code_dim) == (16, 32768, 32)
  assert quantizer.partial_depths == (4, 16) and quantizer.decay == 0.99
  assert quantizer.eps == 1e-5 and quantizer.vq_warmup == 2000
  assert quantizer.dead_code_threshold == 1.0


def test_ema_warmup_laplace_and_dead_code_restart_follow_the_authors_update():
  # Not the authors' numbers (see the test above), but ones under which a 12-vector batch
  # exercises every branch: codes kept and restarted, a visible smoothing, and its clamp.
  decay, eps, warmup, threshold = 0.5, 0.5, 1, 0.5
  quantizer = ResidualQuantizer(num_levels=2, codebook_size=6, code_dim=3, partial_depths=(1, 2),
                                decay=decay, eps=eps, vq_warmup=warmup,
                                dead_code_threshold=threshold, chunk_size=4)
  rng = np.random.default_rng(7)
  batches = [rng.normal(size=(2, 6, 3)).astype(np.float32) for _ in range(3)]
  variables, step_fn = init(quantizer), train_step(quantizer)
  seen = dict(alive_in_warmup=0, alive_after=0, restarted=0, clamped=0)
  for step, x in enumerate(batches):
    before = state_of(variables)
    out, variables = step_fn(variables, jnp.asarray(x), jax.random.key(10 + step))
    after = state_of(variables)
    codes, residuals, _ = greedy_reference(before['codebooks'], x)
    np.testing.assert_array_equal(np.asarray(out[1]).reshape(-1, 2), codes)
    cluster_size, embed_sum = _reference_update(before, residuals, codes, decay, eps, warmup)
    dead = cluster_size < threshold
    for level, code in zip(*np.nonzero(dead)):
      # A restarted code holds one of this level's residual inputs, each used at most once.
      match = np.all(np.isclose(residuals[level], after['embed_sum'][level, code], atol=1e-6),
                     axis=1)
      assert match.any(), (step, level, code)
    for level in range(2):
      rows = after['embed_sum'][level][dead[level]]
      assert len({tuple(r) for r in rows}) == len(rows)
    embed_sum[dead] = after['embed_sum'][dead]
    cluster_size[dead] = 1.0
    np.testing.assert_allclose(after['cluster_size'], cluster_size, rtol=1e-6)
    np.testing.assert_allclose(after['embed_sum'], embed_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after['codebooks'], _laplace_codebooks(cluster_size, embed_sum,
                                                                      eps), rtol=1e-5, atol=1e-6)
    assert after['step'] == step + 1
    assert float(out[3]['dead_codes_restarted']) == dead.sum()
    seen['alive_in_warmup' if step < warmup else 'alive_after'] += (~dead).sum()
    seen['restarted'] += dead.sum()
    seen['clamped'] += (_smoothed_sizes(cluster_size, eps) < 1).sum()
  assert all(seen.values()), seen


def test_restart_from_a_batch_smaller_than_the_codebook_tiles_it_with_noise():
  quantizer = ResidualQuantizer(num_levels=1, codebook_size=8, code_dim=3, partial_depths=(1,),
                                vq_warmup=0, chunk_size=4)
  x = np.random.default_rng(8).normal(size=(3, 3)).astype(np.float32)
  step_fn = train_step(quantizer)
  _, variables = step_fn(init(quantizer), jnp.asarray(x), jax.random.key(1))
  state = state_of(variables)
  # 3 vectors * 0.01 < 1: every code is dead and restarted from ceil(8 / 3) = 3 noisy copies.
  np.testing.assert_array_equal(state['cluster_size'], np.ones((1, 8)))
  offsets = state['embed_sum'][0][:, None, :] - x[None]  # (codes, vectors, d)
  inside = np.all((offsets >= 0) & (offsets < 0.01 / np.sqrt(3)), axis=-1)
  assert np.all(inside.sum(axis=1) >= 1)
  assert not np.any(np.all(offsets == 0, axis=-1))  # every copy carries noise
  assert np.all(inside.sum(axis=0) <= 3)  # each vector has 3 copies to draw from
  np.testing.assert_allclose(state['codebooks'], _laplace_codebooks(
      state['cluster_size'], state['embed_sum'], quantizer.eps), rtol=1e-6)
  # Same key, same draw: every host that runs the step gets the same vectors.
  _, again = step_fn(init(quantizer), jnp.asarray(x), jax.random.key(1))
  np.testing.assert_array_equal(state_of(again)['embed_sum'], state['embed_sum'])
