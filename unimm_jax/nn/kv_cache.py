"""The key/value cache of a layer stack, an explicit pytree passed in and returned.

All layers' keys and values live in two arrays with a leading layer axis. A call with s new
tokens writes them at slots [index, index + s) of every row (rows of a left-padded batch end
together, so one scalar `index` serves the batch). Each layer writes its own slice in place
(`write_layer`: a dynamic-update-slice of the whole buffer, which XLA performs in place on a
loop-carried or donated buffer) and reads its keys back (`read_layer`); nothing else copies
the cache. `order` holds each slot's mask order (see `unimm_jax.nn.masks`; EMPTY for unwritten
and padding slots) and `lengths` how many real tokens each row has seen, which is the RoPE
position of its next token.

keys, values: (layers, b, max_length, kv_heads, head_dim), compute dtype.
order: (b, max_length) int32.
lengths: (b,) int32.
index: () int32, slots written so far.
"""
import flax.struct
import jax
import jax.numpy as jnp

from unimm_jax.nn import masks

# Logical axes of KVCache.keys / .values, for sharding a cache made outside the model.
CACHE_AXES = ('layers', 'batch', 'length', 'heads', 'kv')


@flax.struct.dataclass
class KVCache:
  keys: jax.Array
  values: jax.Array
  order: jax.Array
  lengths: jax.Array
  index: jax.Array

  @property
  def max_length(self) -> int:
    return self.keys.shape[2]


def init_cache(num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
               head_dim: int, dtype) -> KVCache:
  """An empty cache with room for `max_length` tokens (prompt, padding and new tokens)."""
  shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)
  return KVCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                 order=jnp.full((batch_size, max_length), masks.EMPTY, jnp.int32),
                 lengths=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class LayerCache:
  """One layer's view of a KVCache while a stack runs: the whole buffers, the layer's index
  (a Python int when layers are unrolled, traced under `nn.scan`) and the first new slot."""
  keys: jax.Array
  values: jax.Array
  layer: jax.Array | int
  index: jax.Array


def write_layer(cache: LayerCache, keys: jax.Array, values: jax.Array
                ) -> tuple[LayerCache, jax.Array, jax.Array]:
  """Writes this layer's new (b, s, kv_heads, head_dim) keys and values at slot `index`.

  Returns the updated view and the layer's whole (b, max_length, kv_heads, head_dim) keys and
  values, for attention over every slot.
  """
  start = (cache.layer, 0, cache.index, 0, 0)
  all_keys = jax.lax.dynamic_update_slice(cache.keys, keys[None].astype(cache.keys.dtype), start)
  all_values = jax.lax.dynamic_update_slice(cache.values,
                                            values[None].astype(cache.values.dtype), start)
  layer_keys = jax.lax.dynamic_index_in_dim(all_keys, cache.layer, 0, keepdims=False)
  layer_values = jax.lax.dynamic_index_in_dim(all_values, cache.layer, 0, keepdims=False)
  return cache.replace(keys=all_keys, values=all_values), layer_keys, layer_values
