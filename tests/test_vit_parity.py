"""HF parity of `unimm_jax.models.vit` through `unimm_jax.convert.load_pretrained`.

For each family a tiny random model is built with transformers, written with
`save_pretrained`, imported, and its outputs (last hidden state, pooled output, one
intermediate layer) compared with transformers' in float32. Every parameter, norms and
biases included, is drawn at random so a wrong mapping (a transpose, a chunk order, a
missing LayerScale) cannot pass.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from unimm_jax.convert import load_pretrained  # noqa: E402

pytestmark = pytest.mark.parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=4)
ATOL = RTOL = 1e-4


def _randomize(model: 'torch.nn.Module', seed: int) -> None:
  """Every parameter random: N(0, 0.3), norm scales and LayerScale around 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.3
      scale_like = ('norm' in name or 'lambda1' in name) and name.endswith(('weight', 'lambda1'))
      p.copy_(1.0 + noise if scale_like else noise)


def _save(model, path, seed) -> str:
  _randomize(model, seed)
  model.eval()
  model.save_pretrained(path)
  return str(path)


def _torch_out(model, *args, **kwargs):
  with torch.no_grad():
    return model(*args, output_hidden_states=True, **kwargs)


def _nchw(x: np.ndarray) -> 'torch.Tensor':
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _compare(ours: dict, theirs, layer: int = 1) -> None:
  np.testing.assert_allclose(ours['last_hidden_state'], theirs.last_hidden_state.numpy(),
                             atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(ours['pooler_output'], theirs.pooler_output.numpy(),
                             atol=ATOL, rtol=RTOL)
  assert len(ours['hidden_states']) == len(theirs.hidden_states)
  np.testing.assert_allclose(ours['hidden_states'][layer], theirs.hidden_states[layer].numpy(),
                             atol=ATOL, rtol=RTOL)


def _images(b, h, w, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """Writes each family's tiny checkpoint once; returns {name: (dir, torch model)}."""
  root = tmp_path_factory.mktemp('vit_ckpts')
  made = {}
  specs = {
      'siglip': transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
          intermediate_size=64, image_size=16, attn_implementation='eager', **TINY)),
      'siglip2': transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
          intermediate_size=64, num_patches=16, attn_implementation='eager', **TINY)),
      'dinov2': transformers.Dinov2Model(transformers.Dinov2Config(
          image_size=16, attn_implementation='eager', **TINY)),
      'dinov2_swiglu': transformers.Dinov2Model(transformers.Dinov2Config(
          image_size=16, use_swiglu_ffn=True, attn_implementation='eager', **TINY)),
      'clip': transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
          intermediate_size=64, image_size=16, attn_implementation='eager', **TINY)),
  }
  for seed, (name, model) in enumerate(specs.items()):
    made[name] = (_save(model, root / name, seed), model)
  return made


def _load(path, **overrides):
  model, variables = load_pretrained(path, **overrides)
  return jax.jit(model.apply, static_argnames='interpolate_pos_encoding'), variables


@pytest.mark.parametrize('name', ['siglip', 'clip', 'dinov2', 'dinov2_swiglu'])
def test_fixed_resolution_families_match_transformers(checkpoints, name):
  path, torch_model = checkpoints[name]
  apply, variables = _load(path)
  x = _images(2, 16, 16)
  with jax.default_matmul_precision('highest'):
    _compare(apply(variables, x), _torch_out(torch_model, _nchw(x)))


@pytest.mark.parametrize('name', ['siglip', 'clip'])
def test_interpolated_positions_match_transformers(checkpoints, name):
  path, torch_model = checkpoints[name]
  apply, variables = _load(path)
  x = _images(1, 24, 20, seed=1)
  with jax.default_matmul_precision('highest'):
    ours = apply(variables, x, interpolate_pos_encoding=True)
  _compare(ours, _torch_out(torch_model, _nchw(x), interpolate_pos_encoding=True), layer=2)
  with pytest.raises(ValueError, match='interpolate_pos_encoding'):
    apply(variables, x)


@pytest.mark.parametrize('name', ['dinov2', 'dinov2_swiglu'])
def test_dinov2_interpolates_positions_bicubically(checkpoints, name):
  """24 x 22 pixels: a 6 x 5 patch grid (a 2-pixel remainder dropped) from the 4 x 4 grid."""
  path, torch_model = checkpoints[name]
  apply, variables = _load(path)
  x = _images(2, 24, 22, seed=2)
  with jax.default_matmul_precision('highest'):
    ours = apply(variables, x)
  assert ours['last_hidden_state'].shape == (2, 1 + 6 * 5, 32)
  _compare(ours, _torch_out(torch_model, _nchw(x)), layer=2)


def _patchify(images: list[np.ndarray], patch: int, max_patches: int):
  """The Siglip2 processor's layout: patches row-major, (row, col, channel) within a patch,
  zero-padded to max_patches, mask 1 on real patches."""
  pixel_values = np.zeros((len(images), max_patches, patch * patch * 3), np.float32)
  mask = np.zeros((len(images), max_patches), np.int32)
  shapes = np.zeros((len(images), 2), np.int64)
  for i, img in enumerate(images):
    gh, gw = img.shape[0] // patch, img.shape[1] // patch
    patches = img.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4)
    pixel_values[i, :gh * gw] = patches.reshape(gh * gw, -1)
    mask[i, :gh * gw] = 1
    shapes[i] = (gh, gw)
  return pixel_values, mask, shapes


def test_siglip2_three_aspect_ratios_and_padding(checkpoints):
  """Wide (2 x 8 patches), square (4 x 4), tall (8 x 2) and a padded 3 x 5 in one batch."""
  path, torch_model = checkpoints['siglip2']
  apply, variables = _load(path)
  rng = np.random.default_rng(3)
  images = [rng.uniform(-1, 1, (gh * 4, gw * 4, 3)).astype(np.float32)
            for gh, gw in ((2, 8), (4, 4), (8, 2), (3, 5))]
  pixel_values, mask, shapes = _patchify(images, 4, 16)
  with jax.default_matmul_precision('highest'):
    ours = apply(variables, pixel_values, mask, shapes.astype(np.int32))
  theirs = _torch_out(torch_model, torch.from_numpy(pixel_values),
                      pixel_attention_mask=torch.from_numpy(mask),
                      spatial_shapes=torch.from_numpy(shapes))
  _compare(ours, theirs, layer=2)


def test_scan_over_layers_gives_the_same_outputs(checkpoints):
  path, _ = checkpoints['dinov2']
  apply, variables = _load(path)
  scan_apply, scan_variables = _load(path, scan_layers=True, remat=True)
  assert scan_variables['params']['layers']['norm1']['scale'].shape == (3, 32)
  x = _images(1, 16, 16)
  with jax.default_matmul_precision('highest'):
    a, b = apply(variables, x), scan_apply(scan_variables, x)
  for key in ('last_hidden_state', 'pooler_output'):
    np.testing.assert_allclose(a[key], b[key], atol=1e-5)
  np.testing.assert_allclose(a['hidden_states'][2], b['hidden_states'][2], atol=1e-5)


def test_two_tower_checkpoint_imports_its_vision_tower(tmp_path):
  config = transformers.SiglipConfig(
      vision_config=dict(intermediate_size=64, image_size=16, **TINY),
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=50))
  full = transformers.SiglipModel(config)
  path = _save(full, tmp_path / 'siglip_full', seed=7)
  apply, variables = _load(path)
  x = _images(1, 16, 16)
  with jax.default_matmul_precision('highest'):
    ours = apply(variables, x)
  with torch.no_grad():
    theirs = full.vision_model(_nchw(x), output_hidden_states=True)
  _compare(ours, theirs)


def test_bad_checkpoints_are_named(checkpoints, tmp_path):
  from safetensors.numpy import load_file, save_file
  path, _ = checkpoints['clip']
  tensors = load_file(os.path.join(path, 'model.safetensors'))
  config = json.load(open(os.path.join(path, 'config.json')))

  def write(name, tensors, config=config):
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / 'model.safetensors'))
    (d / 'config.json').write_text(json.dumps(config))
    return str(d)

  key = 'encoder.layers.1.mlp.fc1.weight'
  bad_shape = dict(tensors, **{key: np.zeros((65, 32), np.float32)})
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    load_pretrained(write('shape', bad_shape))
  extra = dict(tensors, **{'encoder.layers.9.mlp.fc1.weight': tensors[key]})
  with pytest.raises(ValueError, match=r'encoder\.layers\.9\.mlp\.fc1\.weight'):
    load_pretrained(write('extra', extra))
  missing = {k: v for k, v in tensors.items() if k != 'pre_layrnorm.bias'}
  with pytest.raises(ValueError, match=r'pre_layrnorm\.bias'):
    load_pretrained(write('missing', missing))
  with pytest.raises(ValueError, match="model_type='vit_mae'"):
    load_pretrained(write('arch', tensors, dict(config, model_type='vit_mae')))


_SHARDED_LOAD = textwrap.dedent('''
    import jax, numpy as np, sys
    from jax.sharding import AxisType
    from unimm_jax.config_defaults import DEFAULT_SHARDING_RULES
    from unimm_jax.convert import load_pretrained

    path = sys.argv[1]
    mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
    model, sharded = load_pretrained(path, mesh=mesh, rules=DEFAULT_SHARDING_RULES,
                                     scan_layers=True)
    _, plain = load_pretrained(path, scan_layers=True)
    query = sharded['params']['layers']['attention']['query']  # (layers, embed, heads, kv)
    assert query.shape == (3, 32, 4, 8), query.shape
    assert query.addressable_shards[0].data.shape == (3, 16, 2, 8), query.sharding
    jax.tree.map(np.testing.assert_array_equal, sharded, plain)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with jax.default_matmul_precision('highest'):
      a = jax.jit(model.apply)(sharded, x)['pooler_output']
      b = jax.jit(model.apply)(plain, x)['pooler_output']
    np.testing.assert_allclose(a, b, atol=1e-5)
    print('sharded load ok')
''')


def test_load_onto_a_mesh_places_slices(checkpoints):
  """8 fake devices: each holds its (fsdp, tensor) slice; values equal the unsharded load."""
  path, _ = checkpoints['siglip']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _SHARDED_LOAD, path], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'sharded load ok' in proc.stdout


# ----------------------------------------------------------------------------- teacher
def _teacher(path, **fields):
  from unimm_jax.config_defaults import teacher_config
  from unimm_jax.convert import teacher as teacher_lib
  config = teacher_config()
  config.path = path
  config.update(fields)
  return teacher_lib.load_teacher(config)


def test_teacher_dinov2_intermediate_patch_tokens(checkpoints):
  """hidden_states[-2] without the class token; ImageNet normalisation, bicubic resize."""
  path, torch_model = checkpoints['dinov2']
  teacher, variables = _teacher(path, feature='hidden:-2', drop_class_token=True,
                                image_size=24)
  images = _images(2, 40, 40, seed=4)
  with jax.default_matmul_precision('highest'):
    ours = jax.jit(teacher)(variables, images)
  # Reference preprocessing in torch: antialiased bicubic (A = -0.5, as PIL and jax) to 24 px.
  x01 = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()) * 0.5 + 0.5
  x01 = torch.nn.functional.interpolate(x01, size=(24, 24), mode='bicubic', antialias=True,
                                        align_corners=False)
  mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406),
                                                          (0.229, 0.224, 0.225)))
  theirs = _torch_out(torch_model, (x01 - mean) / std).hidden_states[-2][:, 1:].numpy()
  assert ours.shape == (2, 36, 32)
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)


def test_teacher_siglip2_keeps_aspect_ratio(checkpoints, tmp_path):
  from transformers.models.siglip2.image_processing_pil_siglip2 import (
      get_image_size_for_max_num_patches)
  from unimm_jax.models.teacher import naflex_size
  for h, w, p, n in ((64, 64, 16, 256), (48, 100, 4, 16), (300, 17, 14, 729), (5, 5, 4, 16)):
    assert naflex_size(h, w, p, n) == get_image_size_for_max_num_patches(h, w, p, n)

  path, torch_model = checkpoints['siglip2']
  teacher, variables = _teacher(path, feature='pooled', max_num_patches=16)
  images = _images(1, 20, 40, seed=5)  # 16 patches of 4 px at most: 12 x 20 px, 3 x 5 patches
  inputs = teacher.model_inputs(images)
  gh, gw = 3, 5
  assert naflex_size(20, 40, 4, 16) == (12, 20)
  assert inputs[0].shape == (1, gh * gw, 48) and tuple(inputs[2][0]) == (gh, gw)
  with jax.default_matmul_precision('highest'):
    ours = jax.jit(teacher)(variables, images)
  theirs = _torch_out(torch_model, torch.tensor(np.asarray(inputs[0])),
                      pixel_attention_mask=torch.tensor(np.asarray(inputs[1])),
                      spatial_shapes=torch.tensor(np.asarray(inputs[2], np.int64)))
  np.testing.assert_allclose(ours, theirs.pooler_output.numpy(), atol=ATOL, rtol=RTOL)


def test_teacher_reads_preprocessor_config_and_names_bad_settings(checkpoints, tmp_path):
  import shutil
  path, _ = checkpoints['clip']
  copy = tmp_path / 'clip'
  shutil.copytree(path, copy)
  (copy / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': [0.25, 0.5, 0.75], 'image_std': [0.5, 0.25, 0.125], 'resample': 2}))
  teacher, _ = _teacher(str(copy), dtype='bfloat16')
  assert (teacher.mean, teacher.std, teacher.method) == ((0.25, 0.5, 0.75),
                                                         (0.5, 0.25, 0.125), 'linear')
  (x,) = teacher.model_inputs(np.zeros((1, 16, 16, 3), np.float32))  # grey 0.5
  np.testing.assert_allclose(x[0, 0, 0], [0.5, 0.0, -2.0])
  with pytest.raises(ValueError, match='config.teacher.feature'):
    _teacher(path, feature='hidden:9')
  with pytest.raises(ValueError, match='config.teacher.path'):
    _teacher('')
