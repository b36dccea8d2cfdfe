"""The MingTok authors' weights: their `MingTok.state_dict()` (inclusionAI/Ming-UniVision,
mingtok/modeling_mingtok.py) as a safetensors file -> `models.mingtok.MingTok` params.

Their key -> ours (blocks are chunked once: `blocks.0.{i}`; an unchunked `blocks.{i}` is
read too):
  low_level_encoder.patch_embed.proj (w, 3, P, P) conv   encoder/patch_embedding (P, P, 3, w),
      patch_bias
  low_level_encoder.cls_token (1, 1, w), pos_embed (1, M^2 + 1, w) (class last)
      encoder/class_embedding, position_embedding
  {low_level_encoder|semantic_decoder|pixel_decoder}.blocks.0.{i}.*   <stage>/layers_{i}
      (`convert.hf_vit.fused_qkv_layer`: norm1, attn.qkv, attn.proj, norm2, and mlp.w12 /
      mlp.w3 (SwiGLU: encoder, semantic decoder) or mlp.fc1 / mlp.fc2 (pixel decoder))
  low_level_encoder.out_norm, out_proj              encoder/out_norm, out_proj
  semantic_decoder.in_proj, norm                    semantic_decoder/in_proj, norm
  sem_to_pix                                        pixel_decoder/sem_to_pix
  pixel_decoder.norm, head                          pixel_decoder/norm, head
Ours alone: encoder/mask_token (training only; their release has none): zeros.
Skipped: `target_backbone.*` (the teachers of their training checkpoints, which their loader
drops too). Any other tensor, a missing one or a shape that does not fit config.model is an
error naming it.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert import hf_vit
from unimm_jax.convert.hf_checkpoint import LazyArray, Reader, layer_norm, linear
from unimm_jax.models import mingtok

_SKIPPED = ('target_backbone.',)




def _blocks(read: Reader, cfg: ml_collections.ConfigDict, stage: str, their: str) -> dict:
  """layers_{i} of config.model.<stage> from their `<their>.blocks.[0.]{i}.*`."""
  c = mingtok.block_config(cfg, stage)
  chunked = read.has(f'{their}.blocks.0.0.norm1.weight')
  prefix = f'{their}.blocks.0.' if chunked else f'{their}.blocks.'
  if not read.has(f'{prefix}{c.num_layers - 1}.norm1.weight') or read.has(
      f'{prefix}{c.num_layers}.norm1.weight'):
    raise ValueError(f'{their} does not have config.model.{stage}.depth={c.num_layers} blocks '
                     f'(looked for {prefix}{c.num_layers - 1}.norm1.weight and no more)')
  return {f'layers_{i}': hf_vit.fused_qkv_layer(c, read, f'{prefix}{i}.')
          for i in range(c.num_layers)}


def convert_state_dict_file(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """Their state dict file -> our params (jax arrays, float32). Raises ValueError naming a
  missing, unused or wrongly shaped tensor."""
  checkpoint = hf_checkpoint.state_dict_file(path)
  read = Reader(checkpoint)
  width = model_config.encoder.width
  encoder = {
      'patch_embedding': read('low_level_encoder.patch_embed.proj.weight',
                              lambda w: w.transpose(2, 3, 1, 0)),
      'patch_bias': read('low_level_encoder.patch_embed.proj.bias'),
      'class_embedding': read('low_level_encoder.cls_token', lambda w: w.reshape(-1)),
      'position_embedding': read('low_level_encoder.pos_embed', lambda w: w[0]),
      'mask_token': LazyArray((width,), 'mask_token (ours, not in their release: zeros)',
                              view=lambda: np.zeros((width,), np.float32)),
      'out_norm': layer_norm(read, 'low_level_encoder.out_norm'),
      'out_proj': linear(read, 'low_level_encoder.out_proj'),
      **_blocks(read, model_config, 'encoder', 'low_level_encoder'),
  }
  semantic = {'in_proj': linear(read, 'semantic_decoder.in_proj'),
              'norm': layer_norm(read, 'semantic_decoder.norm'),
              **_blocks(read, model_config, 'semantic', 'semantic_decoder')}
  pixel = {'sem_to_pix': linear(read, 'sem_to_pix'),
           'norm': layer_norm(read, 'pixel_decoder.norm'),
           'head': linear(read, 'pixel_decoder.head'),
           **_blocks(read, model_config, 'pixel', 'pixel_decoder')}
  read.check_all_used(lambda key: key.startswith(_SKIPPED), 'MingTok')
  model = mingtok.MingTok(model_config)
  size = model_config.image_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, size, size, 3), jnp.float32)))
  sources = {'encoder': encoder, 'semantic_decoder': semantic, 'pixel_decoder': pixel}
  return hf_checkpoint.place(sources, abstract['params'])


def load_mingtok_state_dict(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """`convert_state_dict_file`, with `path` in every error."""
  try:
    return convert_state_dict_file(path, model_config)
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from error
