"""Attention masks (`unimm_jax.nn.masks`) against closed forms, and the LLM under each mask.

The LLM tests reuse test_llm's tiny model with random std-0.5 weights, so a token a mask
hides or reveals changes the outputs visibly.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_llm import ATOL, _ids, forward, model_and_params  # noqa: F401 (fixtures)
from unimm_jax.models import llm
from unimm_jax.nn import masks
from unimm_jax.nn.attention import MultiHeadAttention


def _allowed(spec: masks.MaskSpec) -> np.ndarray:
  """(b, s, s) bool: query i may attend to key j."""
  return np.asarray(masks.dense_mask(spec.order, spec.order))[:, 0]


def test_orders_give_the_textbook_masks():
  s = 6
  i, j = np.meshgrid(np.arange(s), np.arange(s), indexing='ij')
  np.testing.assert_array_equal(_allowed(masks.causal(1, s))[0], j <= i)
  np.testing.assert_array_equal(_allowed(masks.bidirectional(1, s))[0], np.ones((s, s), bool))
  # Blocks of 2: a query sees its own block whole and every earlier block.
  np.testing.assert_array_equal(_allowed(masks.block_causal(1, s, 2))[0], j // 2 <= i // 2)
  # Prefix of 3 (row 0) and 1 (row 1, which is plain causal).
  prefix = _allowed(masks.prefix(np.array([3, 1]), s))
  np.testing.assert_array_equal(prefix[0], (j <= i) | ((i < 3) & (j < 3)))
  np.testing.assert_array_equal(prefix[1], j <= i)


def test_bidirectional_span_inside_a_causal_row():
  # Tokens 2..4 are one span (an image): they see each other; the rest stays causal.
  spans = np.array([[0, 0, 7, 7, 7, 0, 0]])
  spec = masks.with_bidirectional_spans(masks.causal(1, 7), spans)
  np.testing.assert_array_equal(np.asarray(spec.order), [[0, 1, 2, 2, 2, 5, 6]])
  s = 7
  i, j = np.meshgrid(np.arange(s), np.arange(s), indexing='ij')
  in_span = (spans[0] > 0)
  want = (j <= i) | (in_span[i] & in_span[j])
  np.testing.assert_array_equal(_allowed(spec)[0], want)
  # Two spans with different ids next to each other stay separate.
  spec = masks.with_bidirectional_spans(masks.causal(1, 4), np.array([[1, 1, 2, 2]]))
  np.testing.assert_array_equal(np.asarray(spec.order), [[0, 0, 2, 2]])


def test_padding_keys_and_segments_are_hidden():
  spec = masks.with_padding(masks.bidirectional(1, 4), np.array([[0, 1, 1, 1]]))
  dense = np.asarray(masks.dense_mask(np.zeros((1, 4), np.int32), spec.order))[0, 0]
  np.testing.assert_array_equal(dense, np.tile([False, True, True, True], (4, 1)))
  seg = np.array([[1, 1, 2, 2]])
  dense = np.asarray(masks.dense_mask(masks.causal(1, 4).order, masks.causal(1, 4).order,
                                      seg, seg))[0, 0]
  np.testing.assert_array_equal(dense, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0],
                                        [0, 0, 1, 1]])


BLOCK, BLOCKS = 3, 3


@pytest.fixture(scope='module')
def block_causal_forward(model_and_params):
  model, _, params = model_and_params
  ids = _ids(2, BLOCK * BLOCKS, seed=7)
  spec = masks.block_causal(2, BLOCK * BLOCKS, BLOCK)
  run = jax.jit(lambda ids, spec: model.apply({'params': params}, ids, mask=spec))
  return ids, run(ids, spec), run


def test_block_causal_equals_each_block_run_after_its_prefix(model_and_params,
                                                             block_causal_forward):
  """BitDance's parallel decoding: the cache holds the earlier blocks, the next block's
  tokens are fed together and see each other; every block equals the full block-causal pass."""
  model, _, params = model_and_params
  ids, full, _ = block_causal_forward
  step = jax.jit(lambda ids, spec, cache: model.apply({'params': params}, ids, mask=spec,
                                                      cache=cache))
  cache = llm.init_cache(model.config, 2, BLOCK * BLOCKS)
  for k in range(BLOCKS):
    block = ids[:, k * BLOCK:(k + 1) * BLOCK]
    spec = masks.block_causal(2, BLOCK, BLOCK, offset=cache.index)
    logits, cache = step(block, spec, cache)
    np.testing.assert_allclose(logits, full[:, k * BLOCK:(k + 1) * BLOCK], atol=ATOL)


def test_block_causal_sees_its_own_block_and_not_later_ones(block_causal_forward, forward):
  ids, full, run = block_causal_forward
  changed = ids.copy()
  changed[:, BLOCK + 2] = (changed[:, BLOCK + 2] + 1) % 100 + 1  # last token of block 1
  out = run(changed, masks.block_causal(2, BLOCK * BLOCKS, BLOCK))
  np.testing.assert_allclose(out[:, :BLOCK], full[:, :BLOCK], atol=ATOL)  # block 0: unchanged
  # The first token of block 1 reads the changed token: not causal.
  assert float(jnp.abs(out[:, BLOCK] - full[:, BLOCK]).max()) > 1e-3
  # Block-causal is not the default causal mask.
  assert float(jnp.abs(forward(ids)[:, BLOCK] - full[:, BLOCK]).max()) > 1e-3


def test_llm_default_mask_is_causal(model_and_params, forward):
  model, _, params = model_and_params
  ids = _ids(2, 8, seed=8)
  got = model.apply({'params': params}, ids, mask=masks.causal(2, 8))
  np.testing.assert_allclose(got, forward(ids), atol=ATOL)


def test_attention_segment_ids_equal_each_segment_alone():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 7, 16)), jnp.float32)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]])
  attention = MultiHeadAttention(4, qkv_bias=True)
  params = nn.unbox(attention.init(jax.random.key(0), x))
  for spec in (None, masks.causal(1, 7)):
    packed = attention.apply(params, x, mask=spec, segment_ids=segments)
    first = attention.apply(params, x[:, :3], mask=None if spec is None else masks.causal(1, 3))
    second = attention.apply(params, x[:, 3:], mask=None if spec is None else masks.causal(1, 4))
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-5)
