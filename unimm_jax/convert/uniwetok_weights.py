"""The authors' UniWeTok autoencoder weights (PyTorch state dict) -> `UniWeTok` params.

Source layout: the state dict of BitDance's `VQModel` (modeling/vision_encoder/
autoencoder_uni.py: `Encoder` + `GANDecoder`), saved as safetensors (float32, float16 or
bfloat16; read as float32). A PyTorch training checkpoint is converted once, with torch:

  import torch, safetensors.torch
  sd = torch.load('uniwetok.ckpt', map_location='cpu')['state_dict']
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'uniwetok.safetensors')

Their architecture is one point of our config space; `model_config` must say so, else a
ValueError names the field: siglu, double_channel_downsample and generative_decoder True,
num_registers 4, every width ch * ch_mult[i] a multiple of 32 (their GroupNorms have 32
groups; ours pick 32 exactly then). num_heads is not in the weights: it must equal the
`n_heads` their model was built with (their default 16).

Mapping (torch key -> our param path under 'params'; L levels, z = groups * group_bits;
conv weights (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear (out, in) -> (in, out);
GroupNorm / RMSNorm weight -> scale):
  encoder.conv_in.weight                     encoder/conv_in/kernel
  encoder.down.{i}.block.{j}.<res>           encoder/down_{i}_block_{j}/<res>
  encoder.down.{i}.downsample.{weight,bias}  encoder/down_{i}_downsample/conv/{kernel,bias}
  encoder.register_token.weight (4, C)       encoder/mid_attn/registers (4, C)
  encoder.mid_attn_blocks.{k}.<block>        encoder/mid_attn/stack/blocks_{k}/<block>
  encoder.norm_out.{weight,bias}             encoder/norm_out/norm/{scale,bias}
  encoder.conv_out.{weight,bias}             encoder/conv_out/{kernel,bias}
  decoder.conv_in.{weight,bias}              decoder/conv_in/{kernel,bias}  (input [z, noise])
  decoder.register_token / mid_attn_blocks   decoder/mid_attn/... as in the encoder
  decoder.mid_block.{j}.<res>                decoder/mid_block_{j}/<res>
  decoder.adaptive.{i}.{gamma,beta}.weight   decoder/adaptive_{i}/{gamma,beta}/kernel (z, C)
  decoder.adaptive.{i}.{gamma,beta}.bias     decoder/adaptive_{i}/{gamma,beta}/bias
  decoder.up.{i}.block.{j}.<res>             decoder/up_{i}_block_{j}/<res>
  decoder.up.{i}.upsample.conv1.*            decoder/up_{i}_upsample/conv1/{kernel,bias}
  decoder.norm_out.*, decoder.conv_out.*     decoder/norm_out/norm/*, decoder/conv_out/*
  <res>: norm1.*, norm2.* -> norm1/norm/*, norm2/norm/*; conv1, conv2, nin_shortcut (when
    the width changes) .weight -> <name>/kernel. Their list index i is the level, also in
    the decoder (built top-down, inserted at the front), so up.{i} is our up_{i}.
  <block>: attention.wqkv.weight (3C, C): row blocks q, k, v, each (heads * head_dim, C)
      head-major -> attention/{query,key,value} (C, heads, head_dim);
    attention.wo.weight (C, C) -> attention/out (heads, head_dim, C);
    feed_forward.w1.weight (2H, C): rows [gate (silu); up] -> feed_forward/w1 (C, 2, H);
    feed_forward.w2.weight (C, H) -> feed_forward/w2/kernel (H, C);
    attention_norm.weight, ffn_norm.weight -> attention_norm/scale, ffn_norm/scale.
With num_attn_blocks 0 their modules still hold register_token (unused): required, dropped.

Optional keys (a training checkpoint's extras), everything else is an error naming the key:
  model_ema.<key without dots>  the EMA copy of <key>; used instead of <key> when present, as
                                their `VQModel.load_from_ckpt` does
  model_ema.decay, model_ema.num_updates   EMA bookkeeping, ignored
  loss.*                        discriminator and perceptual networks of the loss, ignored

Facts read in their code (snapshot 4c5ea90161b7) and confirmed by the parity test
(tests/test_uniwetok_weights.py): RoPE pairs adjacent channels, first head_dim/4 pairs use x;
encoder / decoder position normalisation; DCR depth_to_space; SigLu = 2 sigmoid(x) - 1;
little-endian bit weights within a group (their GFQ); sign(0) = -1 (read only: the fixture
has no exact zeros). One difference: their
AdaptiveGroupNorm takes `var` with PyTorch's default Bessel correction (unbiased, divides by
h*w - 1) although its comment says otherwise; `unimm_jax.nn.norms.AdaptiveGroupNorm` uses
the biased variance, so decoder outputs differ until it does the same.
"""
import dataclasses
from typing import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.flax import load_file

from unimm_jax.models.uniwetok import UniWeTok, downsample_factor
from unimm_jax.nn.mlp import swiglu_hidden_dim

Path = tuple[str, ...]
_GROUPNORM_GROUPS = 32  # nn.GroupNorm(32, C) everywhere in their model
_REGISTERS = 4  # their register_num_tokens, a constant
_EMA_PREFIX = 'model_ema.'
_IGNORED_KEYS = ('model_ema.decay', 'model_ema.num_updates')
_IGNORED_PREFIXES = ('loss.',)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One torch tensor: its shape and how it becomes our leaves ({path: array})."""
  shape: tuple[int, ...]
  convert: Callable[[np.ndarray], dict[Path, np.ndarray]]


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


class _Table:
  """torch key -> _Entry for every tensor of their state dict, built from the config."""

  def __init__(self):
    self.entries: dict[str, _Entry] = {}

  def add(self, key: str, shape: tuple[int, ...],
          convert: Callable[[np.ndarray], dict[Path, np.ndarray]]) -> None:
    self.entries[key] = _Entry(tuple(shape), convert)

  def copy(self, key: str, path: Path, shape: tuple[int, ...]) -> None:
    self.add(key, shape, lambda w: {path: w})

  def conv(self, key: str, path: Path, c_in: int, c_out: int, size: int, bias: bool) -> None:
    self.add(f'{key}.weight', (c_out, c_in, size, size),
             lambda w: {path + ('kernel',): _conv_kernel(w)})
    if bias:
      self.copy(f'{key}.bias', path + ('bias',), (c_out,))

  def linear(self, key: str, path: Path, c_in: int, c_out: int) -> None:
    self.add(f'{key}.weight', (c_out, c_in), lambda w: {path + ('kernel',): w.T})
    self.copy(f'{key}.bias', path + ('bias',), (c_out,))

  def group_norm(self, key: str, path: Path, channels: int) -> None:
    self.copy(f'{key}.weight', path + ('norm', 'scale'), (channels,))
    self.copy(f'{key}.bias', path + ('norm', 'bias'), (channels,))

  def res_block(self, key: str, path: Path, c_in: int, c_out: int) -> None:
    self.group_norm(f'{key}.norm1', path + ('norm1',), c_in)
    self.group_norm(f'{key}.norm2', path + ('norm2',), c_out)
    self.conv(f'{key}.conv1', path + ('conv1',), c_in, c_out, 3, bias=False)
    self.conv(f'{key}.conv2', path + ('conv2',), c_out, c_out, 3, bias=False)
    if c_in != c_out:
      self.conv(f'{key}.nin_shortcut', path + ('nin_shortcut',), c_in, c_out, 1, bias=False)

  def grid_transformer(self, key: str, path: Path, dim: int, heads: int, blocks: int) -> None:
    """`key`.register_token and `key`.mid_attn_blocks -> `path` (a GridTransformer)."""
    registers = path + ('registers',)
    self.add(f'{key}.register_token.weight', (_REGISTERS, dim),
             lambda w: {registers: w} if blocks else {})
    head_dim = dim // heads
    hidden = swiglu_hidden_dim(dim)

    def heads_in(w: np.ndarray) -> np.ndarray:  # (heads * head_dim, C) -> (C, heads, head_dim)
      return w.T.reshape(dim, heads, head_dim)

    for k in range(blocks):
      src, dst = f'{key}.mid_attn_blocks.{k}', path + ('stack', f'blocks_{k}')
      attn = dst + ('attention',)
      self.add(f'{src}.attention.wqkv.weight', (3 * dim, dim), lambda w, attn=attn: {
          attn + (name,): heads_in(part)
          for name, part in zip(('query', 'key', 'value'), np.split(w, 3, axis=0))})
      self.add(f'{src}.attention.wo.weight', (dim, dim),
               lambda w, attn=attn: {attn + ('out',): w.T.reshape(heads, head_dim, dim)})
      self.add(f'{src}.feed_forward.w1.weight', (2 * hidden, dim),
               lambda w, dst=dst: {dst + ('feed_forward', 'w1'): w.T.reshape(dim, 2, hidden)})
      self.add(f'{src}.feed_forward.w2.weight', (dim, hidden),
               lambda w, dst=dst: {dst + ('feed_forward', 'w2', 'kernel'): w.T})
      self.copy(f'{src}.attention_norm.weight', dst + ('attention_norm', 'scale'), (dim,))
      self.copy(f'{src}.ffn_norm.weight', dst + ('ffn_norm', 'scale'), (dim,))


def _check_config(cfg: ml_collections.ConfigDict) -> None:
  required = dict(siglu=True, double_channel_downsample=True, generative_decoder=True,
                  num_registers=_REGISTERS)
  for field, value in required.items():
    if cfg[field] != value:
      raise ValueError(f'model_config.{field}={cfg[field]!r}: the authors\' UniWeTok '
                       f'autoencoder has {field}={value!r}')
  for mult in cfg.ch_mult:
    if (cfg.ch * mult) % _GROUPNORM_GROUPS:
      raise ValueError(f'model_config.ch * ch_mult = {cfg.ch} * {mult} is not a multiple of '
                       f'{_GROUPNORM_GROUPS}, the GroupNorm group count of the authors\' model')
  top = cfg.ch * cfg.ch_mult[-1]
  if cfg.num_attn_blocks and top % cfg.num_heads:
    raise ValueError(f'model_config.num_heads={cfg.num_heads} does not divide the transformer '
                     f'width {top}')


def state_dict_table(model_config: ml_collections.ConfigDict) -> dict[str, _Entry]:
  """Every required key of their state dict for `model_config`, with shape and conversion."""
  cfg = model_config
  _check_config(cfg)
  widths = [cfg.ch * m for m in cfg.ch_mult]
  z = cfg.groups * cfg.group_bits
  nrb, levels = cfg.num_res_blocks, len(widths)
  t = _Table()

  t.conv('encoder.conv_in', ('encoder', 'conv_in'), 3, cfg.ch, 3, bias=False)
  for i, width in enumerate(widths):
    for j in range(nrb):
      t.res_block(f'encoder.down.{i}.block.{j}', ('encoder', f'down_{i}_block_{j}'), width, width)
    if i < levels - 1:
      t.conv(f'encoder.down.{i}.downsample', ('encoder', f'down_{i}_downsample', 'conv'),
             width, widths[i + 1], 3, bias=True)
  t.grid_transformer('encoder', ('encoder', 'mid_attn'), widths[-1], cfg.num_heads,
                     cfg.num_attn_blocks)
  t.group_norm('encoder.norm_out', ('encoder', 'norm_out'), widths[-1])
  t.conv('encoder.conv_out', ('encoder', 'conv_out'), widths[-1], z, 1, bias=True)

  width = widths[-1]
  t.conv('decoder.conv_in', ('decoder', 'conv_in'), 2 * z, width, 3, bias=True)
  t.grid_transformer('decoder', ('decoder', 'mid_attn'), width, cfg.num_heads,
                     cfg.num_attn_blocks)
  for j in range(nrb):
    t.res_block(f'decoder.mid_block.{j}', ('decoder', f'mid_block_{j}'), width, width)
  for i in reversed(range(levels)):
    for name in ('gamma', 'beta'):
      t.linear(f'decoder.adaptive.{i}.{name}', ('decoder', f'adaptive_{i}', name), z, width)
    for j in range(nrb):
      t.res_block(f'decoder.up.{i}.block.{j}', ('decoder', f'up_{i}_block_{j}'), width,
                  widths[i])
      width = widths[i]
    if i > 0:
      t.conv(f'decoder.up.{i}.upsample.conv1', ('decoder', f'up_{i}_upsample', 'conv1'),
             width, 4 * width, 3, bias=True)
  t.group_norm('decoder.norm_out', ('decoder', 'norm_out'), width)
  t.conv('decoder.conv_out', ('decoder', 'conv_out'), width, 3, 3, bias=True)
  return t.entries


def _select_tensors(tensors: Mapping[str, np.ndarray], table: Mapping[str, _Entry]
                    ) -> dict[str, np.ndarray]:
  """Key -> the tensor to use (the EMA copy where one exists); validates every key."""
  ema_of = {_EMA_PREFIX + key.replace('.', ''): key for key in table}
  for key in sorted(tensors):
    if (key not in table and key not in ema_of and key not in _IGNORED_KEYS
        and not key.startswith(_IGNORED_PREFIXES)):
      raise ValueError(f'unexpected key {key!r} (not part of the UniWeTok autoencoder for this '
                       'config; see unimm_jax.convert.uniwetok_weights for the optional keys)')
  chosen = {}
  for key, entry in table.items():
    if key not in tensors:
      raise ValueError(f'missing key {key!r} (expected shape {entry.shape})')
    for name in (key, _EMA_PREFIX + key.replace('.', '')):
      if name in tensors and tuple(tensors[name].shape) != entry.shape:
        raise ValueError(f'key {name!r} has shape {tuple(tensors[name].shape)}, '
                         f'expected {entry.shape}')
    ema = _EMA_PREFIX + key.replace('.', '')
    chosen[key] = tensors[ema] if ema in tensors else tensors[key]
  return chosen


def _check_against_model(flat: dict[Path, np.ndarray], cfg: ml_collections.ConfigDict) -> None:
  """The converted tree must be exactly the model's (names and shapes): guards the table
  against drift of the model's parameter layout."""
  size = downsample_factor(cfg)
  abstract = jax.eval_shape(
      lambda: UniWeTok(cfg).init({'params': jax.random.key(0), 'noise': jax.random.key(1)},
                                 jnp.zeros((1, size, size, 3)), train=False))
  expected = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(abstract)['params'])
  for path in sorted(set(expected) | set(flat)):
    name = '/'.join(path)
    if path not in flat:
      raise ValueError(f'the converter has no value for the model parameter {name}')
    if path not in expected:
      raise ValueError(f'the converter produced {name}, which the model does not have')
    if flat[path].shape != expected[path].shape:
      raise ValueError(f'converted {name} has shape {flat[path].shape}, the model expects '
                       f'{expected[path].shape}')


def convert_state_dict(tensors: Mapping[str, np.ndarray],
                       model_config: ml_collections.ConfigDict) -> dict:
  """Their state dict (key -> array in PyTorch layout) -> our 'params' tree.

  Args:
    tensors: key -> array (numpy or jax; any float dtype); see the module docstring.
    model_config: `config.model` of configs/uniwetok.py, matching their constructor.
  Returns:
    The nested 'params' dict of float32 jax arrays: `UniWeTok(model_config).apply(
    {'params': params}, ...)`.
  Raises:
    ValueError naming a missing, unexpected or wrongly shaped key, or a config field that
    their model cannot have.
  """
  table = state_dict_table(model_config)
  chosen = _select_tensors(tensors, table)
  flat = {}
  for key, entry in table.items():
    flat.update(entry.convert(np.asarray(chosen[key], np.float32)))
  _check_against_model(flat, model_config)
  return flax.traverse_util.unflatten_dict(
      {path: jnp.asarray(value) for path, value in flat.items()})


def load_uniwetok_state_dict(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """Reads a safetensors file of their state dict; returns our 'params' tree (float32).

  Raises ValueError (prefixed with `path`) as `convert_state_dict` does.
  """
  tensors = load_file(path)
  try:
    return convert_state_dict(tensors, model_config)
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from error
