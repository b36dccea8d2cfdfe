"""The Ming-UniVision authors' weights (inclusionAI/Ming-UniVision, mingunivision/): their
flow head -> `models.flow_head.FlowHead` params.

Their `BailingMoeForCausalLM` holds the head beside the LLM as `vis_head` (the condition
projection) and `diffloss.net` (`SimpleMLPAdaLN`); in the saved unified model both sit under
`model.` (`model.vis_head.0.weight`, `model.diffloss.net.input_proj.weight`). The prefix in
front of `diffloss.net.` is found, and must be the only one. Their key -> ours (the mapping
and the two chunk reorders are in `models.flow_head`'s docstring):
  vis_head.{0, 1}                                 condition_proj, condition_norm
  diffloss.net.input_proj, cond_embed             net/input_proj, net/cond_embed
  diffloss.net.time_embed.mlp.{0, 2}              net/time_embed/{time_in, time_out}
  diffloss.net.res_blocks.{i}.in_ln               net/res_blocks_{i}/norm
  diffloss.net.res_blocks.{i}.mlp.w12 ((2 h, W): gate rows first), w3
                                                  net/res_blocks_{i}/mlp/{w1 (W, 2, h),
                                                  w1_bias (2, h), w2}
  diffloss.net.res_blocks.{i}.adaLN_modulation.1  net/adaln_{i} (rows (shift, scale, gate)
                                                  -> columns (scale, shift, gate))
  diffloss.net.final_layer.adaLN_modulation.1     net/final_adaln ((shift, scale) -> (scale,
                                                  shift))
  diffloss.net.final_layer.linear                 net/final_linear
Other tensors of the file (the LLM's) are not read; a head tensor not used, a missing one or
a shape that does not fit the head's config is an error naming it.
"""
import jax
import jax.numpy as jnp

from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert.hf_checkpoint import Reader, layer_norm, linear
from unimm_jax.models.flow_head import FlowHead

NET = 'diffloss.net.'
_MARKER = NET + 'input_proj.weight'


def _dense(read: Reader, key: str, chunk_order: tuple[int, ...] | None = None) -> dict:
  """Linear weight (out, in) -> kernel (in, out); with chunk_order, the output is split into
  len(chunk_order) equal chunks taken in that order (an adaLN's (shift, scale, ...) -> ours)."""
  if chunk_order is None:
    return linear(read, key)
  k, order = len(chunk_order), list(chunk_order)
  return {'kernel': read(f'{key}.weight',
                         lambda w: w.reshape(k, -1, w.shape[-1])[order].reshape(w.shape).T),
          'bias': read(f'{key}.bias', lambda w: w.reshape(k, -1)[order].reshape(-1))}



def _swiglu(read: Reader, key: str) -> dict:
  """Their fused SwiGLU (w12 rows [gate | up], w3) -> ours (w1 (W, 2, h), w1_bias, w2)."""
  return {'w1': read(f'{key}.w12.weight', lambda w: w.reshape(2, -1, w.shape[-1])
                     .transpose(2, 0, 1)),
          'w1_bias': read(f'{key}.w12.bias', lambda w: w.reshape(2, -1)),
          'w2': _dense(read, f'{key}.w3')}


def flow_head_sources(read: Reader, head: FlowHead) -> dict:
  """Their vis_head / diffloss.net tensors (under read.prefix) as `head`'s params (LazyArrays,
  the module docstring's mapping)."""
  depth = head.config.depth
  last, extra = f'{NET}res_blocks.{depth - 1}.in_ln.weight', f'{NET}res_blocks.{depth}.in_ln.weight'
  if not read.has(last) or read.has(extra):
    raise ValueError(f'the checkpoint does not have flow_head.depth={depth} blocks (looked for '
                     f'{read.prefix}{last} and no {read.prefix}{extra})')
  net = {'input_proj': _dense(read, NET + 'input_proj'),
         'cond_embed': _dense(read, NET + 'cond_embed'),
         'time_embed': {'time_in': _dense(read, NET + 'time_embed.mlp.0'),
                        'time_out': _dense(read, NET + 'time_embed.mlp.2')},
         'final_adaln': _dense(read, NET + 'final_layer.adaLN_modulation.1', (1, 0)),
         'final_linear': _dense(read, NET + 'final_layer.linear')}
  for i in range(depth):
    p = f'{NET}res_blocks.{i}.'
    net[f'adaln_{i}'] = _dense(read, p + 'adaLN_modulation.1', (1, 0, 2))
    net[f'res_blocks_{i}'] = {'norm': layer_norm(read, p + 'in_ln'), 'mlp': _swiglu(read, p + 'mlp')}
  return {'condition_proj': _dense(read, 'vis_head.0'),
          'condition_norm': layer_norm(read, 'vis_head.1'), 'net': net}


def load_flow_head(path: str, head: FlowHead) -> dict:
  """Their flow head from a safetensors state dict (the head alone or the whole model) ->
  `head`'s params (float32 jax arrays). Raises ValueError naming `path` and a missing, unused
  or wrongly shaped tensor."""
  checkpoint = hf_checkpoint.state_dict_file(path)
  prefixes = sorted({k[:-len(_MARKER)] for k in checkpoint.tensors if k.endswith(_MARKER)})
  if len(prefixes) != 1:
    raise ValueError(f'{path}: expected one flow head ({_MARKER}), found it under prefixes '
                     f'{prefixes}')
  read = Reader(checkpoint, prefixes[0])
  cfg = head.config
  try:
    sources = flow_head_sources(read, head)
    ours = tuple(read.prefix + p for p in ('vis_head.', 'diffloss.'))
    read.check_all_used(lambda key: not key.startswith(ours), 'flow head')
    abstract = jax.eval_shape(lambda: head.init(
        jax.random.key(0), jnp.zeros((1, cfg.latent_dim)), jnp.zeros((1,)),
        jnp.zeros((1, cfg.input_width))))
    return hf_checkpoint.place(sources, abstract['params'])
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from error

