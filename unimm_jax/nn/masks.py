"""Attention masks from one rule: key k is visible to query q when order[k] <= order[q].

Every token carries an integer `order`; a `MaskSpec` is that (b, s) array. The usual masks are
orders (for a row of length s, token i):

  causal          order = i                    each token sees itself and what came before
  bidirectional   order = 0                    every token sees every token
  block_causal    order = i // block_size      blocks of P tokens see each other and earlier
                                               blocks (BitDance's parallel head, P tokens at once);
                                               optionally after a causal prefix of C tokens:
                                               order = i for i < C, C + (i - C) // P after
  prefix          order = max(0, i - L + 1)    the first L tokens see each other (a prefix LM)
  spans           an existing order, with every token of a span (a run of equal nonzero span
                  ids, e.g. an image in a causal sequence) given the order of the span's first
                  token: the span is bidirectional inside and causal outside

On top of the order rule, `segment_ids` keep attention inside a packed document, and a key
whose order is `EMPTY` (padding, an unwritten cache slot) is seen by no query. Orders are
absolute: a KV cache stores the order of every slot it holds, and new tokens compare their own
orders against them, so a cached decode follows the same mask as one full forward pass.
"""
import flax.struct
import jax
import jax.numpy as jnp

# The order of keys that no query may see: left padding, unwritten cache slots.
EMPTY = jnp.iinfo(jnp.int32).max


@flax.struct.dataclass
class MaskSpec:
  """What each query may attend to. order: (b, s) int32, see the module docstring."""
  order: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return self.order.shape


def causal(batch: int, length: int, offset: int | jax.Array = 0) -> MaskSpec:
  """Token i has order offset + i: the standard decoder mask."""
  return MaskSpec(jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length)))


def bidirectional(batch: int, length: int) -> MaskSpec:
  """Every token sees every (non-padding) token."""
  return MaskSpec(jnp.zeros((batch, length), jnp.int32))


def block_causal(batch: int, length: int, block_size: int, offset: int | jax.Array = 0,
                 causal_prefix: int = 0) -> MaskSpec:
  """Blocks of `block_size` consecutive tokens see each other and every earlier block.

  causal_prefix: the first C tokens (absolute positions, counting `offset`) are causal, one
  token per order, and the blocks start after them (BitDance: the class tokens, then blocks
  of P image tokens). Token i (absolute) has order i below C and C + (i - C) // P from C on.
  """
  if block_size < 1:
    raise ValueError(f'block_size={block_size} must be >= 1')
  if causal_prefix < 0:
    raise ValueError(f'causal_prefix={causal_prefix} must be >= 0')
  i = offset + jnp.arange(length, dtype=jnp.int32)
  order = jnp.where(i < causal_prefix, i,
                    causal_prefix + (i - causal_prefix) // block_size)
  return MaskSpec(jnp.broadcast_to(order, (batch, length)))


def prefix(prefix_lengths: jax.Array, length: int) -> MaskSpec:
  """prefix_lengths (b,): row r's first prefix_lengths[r] tokens see each other; the rest is
  causal (each later token sees the whole prefix)."""
  i = jnp.arange(length, dtype=jnp.int32)[None]
  lengths = jnp.asarray(prefix_lengths, jnp.int32)[:, None]
  return MaskSpec(jnp.maximum(i - lengths + 1, 0))


def with_bidirectional_spans(spec: MaskSpec, span_ids: jax.Array) -> MaskSpec:
  """`spec` with each run of equal nonzero `span_ids` (b, s) made bidirectional inside: every
  token of the run takes the order of the run's first token."""
  span_ids = jnp.asarray(span_ids)
  i = jnp.arange(span_ids.shape[1], dtype=jnp.int32)[None]
  starts = jnp.concatenate([jnp.ones_like(span_ids[:, :1], bool),
                            span_ids[:, 1:] != span_ids[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, i, 0), axis=1)  # index of each run's first token
  first_order = jnp.take_along_axis(spec.order, first, axis=1)
  return MaskSpec(jnp.where(span_ids > 0, first_order, spec.order))


def with_padding(spec: MaskSpec, real: jax.Array) -> MaskSpec:
  """Padding tokens (real == 0, (b, s)) get order EMPTY, so no query attends to them."""
  return MaskSpec(jnp.where(jnp.asarray(real).astype(bool), spec.order, EMPTY))


def dense_mask(query_order: jax.Array, key_order: jax.Array,
               query_segments: jax.Array | None = None,
               key_segments: jax.Array | None = None) -> jax.Array:
  """The boolean mask `jax.nn.dot_product_attention` takes.

  Shapes: query_order (b, q), key_order (b, k), segments the same or None -> (b, 1, q, k),
  True where the query may attend to the key.
  """
  keep = key_order[:, None, :] <= query_order[:, :, None]
  keep &= (key_order != EMPTY)[:, None, :]
  if query_segments is not None:
    keep &= query_segments[:, :, None] == key_segments[:, None, :]
  return keep[:, None]
