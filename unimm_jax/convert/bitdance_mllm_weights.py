"""The BitDance authors' MLLM weights (shallowdream204/BitDance, modeling/mllm.py `MLLModel`):
its vision diffusion head -> `models.bit_diffusion.BitDiffusionHead` params, its input
connector -> `nn.mlp.Projector` params, and its Qwen3 LLM -> `models.llm.LLM` params.

A state dict of their whole model holds `vision_diffusion_head.*` (their `DiffHead`,
modeling/vision_head/flow_head_parallel_x.py), `embed_vision_mlp.*` (their `MLPconnector`,
modeling/utils.py: bits -> LLM width, tanh GELU), `llm_model.*` (Qwen3ForCausalLM) and
`vision_encoder.*` (the autoencoder, not read here). Their released pipeline keeps the same
modules in separate files (vision_head.safetensors, keys `net.*`; projector.safetensors,
`fc1.*`, `fc2.*`; the LLM as a transformers directory, for `convert.load_pretrained`):
`load_vision_head` / `load_connector` with prefix '' read those.

Their key (under `vision_diffusion_head.net.`) -> ours, W the head width, H = W / 128 heads
of K = 128 channels (their TransBlock's fixed head size), h = 1.5 W:
  input_proj, cond_embed                   input_proj, cond_embed
  time_embed.mlp.{0, 2}                    time_embed/{time_in, time_out}
  ada_ln_blocks.{k} (6 W rows: scale1, shift1, gate1, scale2, shift2, gate2, our order too)
                                           adaln_{k}
  res_blocks.{i}.norm1, norm2              res_blocks_{i}/attention_norm, ffn/norm
  res_blocks.{i}.attn.wqkv (3 W, W): rows [q | k | v], heads contiguous in each
                                           res_blocks_{i}/attention/{query, key, value}
                                           (W, H, K) (+ `_bias` (H, K))
  res_blocks.{i}.attn.wo (W, W)            res_blocks_{i}/attention/out (H, K, W) (+ out_bias)
  use_swiglu: res_blocks.{i}.w1 ((2 h, W): gate rows first), w2
                                           res_blocks_{i}/ffn/mlp/{w1 (W, 2, h), w1_bias
                                           (2, h), w2}
  else: res_blocks.{i}.mlp.{0, 2}          res_blocks_{i}/ffn/mlp/{fc1, fc2}
  final_layer.ada_ln_modulation ((scale, shift) rows, our order too)
                                           final_adaln
  final_layer.linear                       final_linear
(every Linear: weight (out, in) -> kernel (in, out), bias -> bias). The connector:
`embed_vision_mlp.fc{1, 2}` -> fc{1, 2}. Tensors outside the prefixes read are not read; a
head or connector tensor not used, a missing one or a shape that does not fit the modules is
an error naming it. Their LLM: `llm_model.` + the Qwen3ForCausalLM keys (`convert_llm`).
"""
import dataclasses

import jax
import jax.numpy as jnp

from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert import hf_llm
from unimm_jax.convert.hf_checkpoint import Reader, layer_norm, linear
from unimm_jax.models.bit_diffusion import BitDiffusionHead
from unimm_jax.models.llm import LLMConfig
from unimm_jax.nn.mlp import Projector

HEAD_PREFIX = 'vision_diffusion_head.'
CONNECTOR_PREFIX = 'embed_vision_mlp.'
LLM_PREFIX = 'llm_model.'
HEAD_DIM = 128  # their TransBlock: Attention(channels, n_head=channels // 128)


def vision_head(model_dim: int, num_blocks: int, num_adaln: int, use_swiglu: bool = False,
                dtype=jnp.float32) -> BitDiffusionHead:
  """Our head for their `model.head.vision_pred` settings (their defaults for use_swiglu;
  their 14B configs: 5120, 6, 2, True)."""
  return BitDiffusionHead(model_dim, num_blocks, num_adaln, attention_heads=model_dim // HEAD_DIM,
                          mlp_bias=True, bounded=True, swiglu=use_swiglu, dtype=dtype)


def connector(hidden_size: int, dtype=jnp.float32) -> Projector:
  """Our module for their `MLPconnector(latent_dim, hidden_size, 'gelu_pytorch_tanh')`."""
  return Projector(hidden_size, hidden_size, dtype=dtype, approximate_gelu=True)


def _check_head(head: BitDiffusionHead) -> None:
  """Raises ValueError when `head` would load their weights but compute something else."""
  want = dict(attention_heads=head.width // HEAD_DIM, bounded=True, mlp_bias=True)
  wrong = {k: getattr(head, k) for k, v in want.items() if getattr(head, k) != v}
  if head.width % HEAD_DIM or wrong:
    raise ValueError(f'BitDiffusionHead(width={head.width}, {wrong}) is not their MLLM head: '
                     f'width a multiple of {HEAD_DIM}, {want} (`vision_head` builds it)')




def attention_sources(read: Reader, key: str, num_heads: int) -> dict:
  """Their `Attention` at `key` (wqkv, wo with biases) -> `nn.attention.MultiHeadAttention`
  'flat' params with `num_heads` heads (their MLLM head: width // 128)."""
  sources = {}
  for j, name in enumerate(('query', 'key', 'value')):
    sources[name] = read(f'{key}.wqkv.weight', lambda w, j=j: w.reshape(
        3, num_heads, -1, w.shape[-1])[j].transpose(2, 0, 1))
    sources[f'{name}_bias'] = read(f'{key}.wqkv.bias',
                                   lambda b, j=j: b.reshape(3, num_heads, -1)[j])
  sources['out'] = read(f'{key}.wo.weight', lambda w: w.T.reshape(num_heads, -1, w.shape[0]))
  sources['out_bias'] = read(f'{key}.wo.bias')
  return sources


def head_sources(read: Reader, head: BitDiffusionHead, prefix: str = HEAD_PREFIX) -> dict:
  """Their DiffHead's tensors under `prefix` as `head`'s params (LazyArrays, the module
  docstring's mapping)."""
  _check_head(head)
  net = prefix + 'net.'
  last, extra = (f'{net}res_blocks.{i}.norm1.weight' for i in (head.depth - 1, head.depth))
  if not read.has(last) or read.has(extra):
    raise ValueError(f'the checkpoint does not have depth={head.depth} head blocks (looked for '
                     f'{last} and no {extra})')
  sources = {'input_proj': linear(read, net + 'input_proj'),
             'cond_embed': linear(read, net + 'cond_embed'),
             'time_embed': {'time_in': linear(read, net + 'time_embed.mlp.0'),
                            'time_out': linear(read, net + 'time_embed.mlp.2')},
             'final_adaln': linear(read, net + 'final_layer.ada_ln_modulation'),
             'final_linear': linear(read, net + 'final_layer.linear')}
  for k in range(head.adaln_blocks):
    sources[f'adaln_{k}'] = linear(read, f'{net}ada_ln_blocks.{k}')
  for i in range(head.depth):
    p = f'{net}res_blocks.{i}.'
    if head.swiglu:
      mlp = {'w1': read(p + 'w1.weight', lambda w: w.reshape(2, -1, w.shape[-1])
                        .transpose(2, 0, 1)),
             'w1_bias': read(p + 'w1.bias', lambda b: b.reshape(2, -1)),
             'w2': linear(read, p + 'w2')}
    else:
      mlp = {'fc1': linear(read, p + 'mlp.0'), 'fc2': linear(read, p + 'mlp.2')}
    sources[f'res_blocks_{i}'] = {
        'attention_norm': layer_norm(read, p + 'norm1'),
        'attention': attention_sources(read, p + 'attn', head.attention_heads),
        'ffn': {'norm': layer_norm(read, p + 'norm2'), 'mlp': mlp}}
  return sources


def connector_sources(read: Reader, prefix: str = CONNECTOR_PREFIX) -> dict:
  """Their MLPconnector's tensors under `prefix` as `connector`'s params (LazyArrays)."""
  return {'fc1': linear(read, prefix + 'fc1'), 'fc2': linear(read, prefix + 'fc2')}


def _load(path: str, parts: dict, what: str) -> dict:
  """parts: name -> (module, example inputs, prefix, sources(read, prefix)). Each part's
  params placed as float32 jax arrays, once every tensor under the parts' prefixes is known
  to be used; errors name `path`."""
  read = Reader(hf_checkpoint.state_dict_file(path))
  try:
    sources = {name: fn(read, prefix) for name, (_, _, prefix, fn) in parts.items()}
    prefixes = tuple(prefix for _, _, prefix, _ in parts.values())
    read.check_all_used(lambda key: not key.startswith(prefixes), what)
    out = {}
    for name, (module, inputs, _, _) in parts.items():
      abstract = jax.eval_shape(lambda module=module, inputs=inputs: module.init(
          jax.random.key(0), *inputs))
      out[name] = hf_checkpoint.place(sources[name], abstract['params'])
    return out
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from error


def _head_part(head: BitDiffusionHead, latent_dim: int, hidden_size: int, prefix: str):
  inputs = (jnp.zeros((1, 1, latent_dim)), jnp.zeros((1, 1)), jnp.zeros((1, 1, hidden_size)))
  return head, inputs, prefix, lambda read, prefix: head_sources(read, head, prefix)


def _connector_part(latent_dim: int, hidden_size: int, prefix: str):
  return connector(hidden_size), (jnp.zeros((1, latent_dim)),), prefix, connector_sources


def load_mllm_heads(path: str, head: BitDiffusionHead, *, latent_dim: int,
                    hidden_size: int) -> dict:
  """Their MLLModel's head and connector from a safetensors state dict of the whole model.

  Args:
    path: the .safetensors file (`vision_diffusion_head.*`, `embed_vision_mlp.*`; other keys
      are not read).
    head: our head for their settings (`vision_head`).
    latent_dim: the bits per token (their autoencoder's z_channels: 32).
    hidden_size: the LLM width (the head's condition and the connector's output: 5120).
  Returns:
    {'head': `head`'s params, 'connector': the params of `connector(hidden_size)`}, float32.
  Raises:
    ValueError naming `path` and a missing, unused or wrongly shaped tensor.
  """
  return _load(path, {'head': _head_part(head, latent_dim, hidden_size, HEAD_PREFIX),
                      'connector': _connector_part(latent_dim, hidden_size, CONNECTOR_PREFIX)},
               'MLLM head and connector')


def load_vision_head(path: str, head: BitDiffusionHead, *, latent_dim: int, hidden_size: int,
                     prefix: str = HEAD_PREFIX) -> dict:
  """`head`'s params alone from the DiffHead tensors under `prefix` of `path` ('' for their
  released vision_head.safetensors); as `load_mllm_heads` otherwise."""
  return _load(path, {'head': _head_part(head, latent_dim, hidden_size, prefix)},
               'MLLM vision head')['head']


def load_connector(path: str, *, latent_dim: int, hidden_size: int,
                   prefix: str = CONNECTOR_PREFIX) -> dict:
  """`connector(hidden_size)`'s params from the MLPconnector tensors under `prefix` of `path`
  ('' for their released projector.safetensors); as `load_mllm_heads` otherwise."""
  return _load(path, {'connector': _connector_part(latent_dim, hidden_size, prefix)},
               'MLLM connector')['connector']


def convert_llm(path: str, config: LLMConfig) -> hf_checkpoint.Converted:
  """Their LLM (`llm_model.` + Qwen3ForCausalLM keys) from a state dict of the whole MLLModel,
  by the transformers converter (`hf_llm.convert`), as a `Converted` (lazy sources; place
  them with `hf_checkpoint.place`, on a mesh if wanted).

  config: the LLM's `LLMConfig` (e.g. `hf_llm.llm_config` of Qwen3-14B's config.json, with
  vocab_size their resized vocabulary: Qwen3's tokens plus their resolution and query tokens).
  Raises ValueError when the file has no `llm_model.` tensors, or names a missing, unused or
  wrongly shaped one.
  """
  checkpoint = hf_checkpoint.state_dict_file(path)
  tensors = {k[len(LLM_PREFIX):]: v for k, v in checkpoint.tensors.items()
             if k.startswith(LLM_PREFIX)}
  if not tensors:
    raise ValueError(f'{path}: no {LLM_PREFIX}* tensors (not a state dict of their whole '
                     'MLLModel; a transformers LLM directory loads with load_pretrained)')
  # hf_llm.convert reads its LLMConfig from config.json, and every field of `config` overrides
  # what it reads: this stand-in holds only the keys it requires, and 'qwen3' for the
  # transformers key layout.
  stand_in = dict(model_type='qwen3', vocab_size=config.vocab_size,
                  hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads)
  llm_part = hf_checkpoint.HFCheckpoint.from_tensors(
      f'{checkpoint.path} (under {LLM_PREFIX})', stand_in, tensors)
  return hf_llm.convert(llm_part, **{f.name: getattr(config, f.name)
                                     for f in dataclasses.fields(config)})
