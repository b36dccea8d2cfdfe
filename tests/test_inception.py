"""FID InceptionV3: parity with pytorch-fid's own network, loader checks, resize and pools.

The parity inception_reference is tests/fixtures/inception_reference.npz, made by pytorch-fid itself
(tests/fixtures/make_inception_fixture.py, separate venv) with weights that
tests/inception_fixture_weights.py regenerates here from the stored keys, shapes and seed.
"""
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from unimm_jax.convert.inception_weights import load_fid_inception
from unimm_jax.models.inception import (FIDInceptionV3, _avg_pool_3x3_same, _max_pool_3x3,
                                        resize_bilinear_like_torch)

pytestmark = pytest.mark.parity

def test_features_match_pytorch_fid(inception_reference, inception_weights_file):
  model, variables = load_fid_inception(inception_weights_file)
  assert isinstance(model, FIDInceptionV3)
  assert set(variables) == {'params', 'batch_stats'}
  images = inception_reference['images']
  assert images.shape == (2, 72, 88, 3)
  features = np.asarray(jax.jit(model.apply)(variables, images))
  assert features.shape == (2, 2048) and features.dtype == np.float32
  np.testing.assert_allclose(features, inception_reference['features'], rtol=1e-4, atol=1e-4)


def _write(state_dict, tmp_path):
  path = str(tmp_path / 'weights.safetensors')
  save_file(state_dict, path)
  return path


def test_loader_accepts_a_state_dict_without_batch_counters(inception_reference, tmp_path):
  # The original .pth may predate BatchNorm's num_batches_tracked buffer.
  state = {k: v for k, v in inception_reference['state_dict'].items() if 'num_batches_tracked' not in k}
  _, variables = load_fid_inception(_write(state, tmp_path))
  kernel = variables['params']['Mixed_7c']['branch3x3_2a']['conv']['kernel']
  want = inception_reference['state_dict']['Mixed_7c.branch3x3_2a.conv.weight'].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel, want)
  np.testing.assert_array_equal(variables['batch_stats']['Conv2d_1a_3x3']['bn']['var'],
                                inception_reference['state_dict']['Conv2d_1a_3x3.bn.running_var'])


@pytest.mark.parametrize('edit, message', [
    ('drop', "missing key 'Mixed_6c.branch7x7dbl_4.bn.running_var'"),
    ('drop_fc', "missing key 'fc.bias'"),
    ('extra', "unexpected key 'AuxLogits.fc.weight'"),
    ('extra_counter', "unexpected key 'Mixed_5b.branch9.bn.num_batches_tracked'"),
    ('reshape', "key 'Mixed_5b.branch_pool.conv.weight' has shape (64, 192, 1, 1), "
                "expected (32, 192, 1, 1)"),
])
def test_loader_names_the_bad_key(inception_reference, tmp_path, edit, message):
  state = dict(inception_reference['state_dict'])
  if edit == 'drop':
    del state['Mixed_6c.branch7x7dbl_4.bn.running_var']
  elif edit == 'drop_fc':
    del state['fc.bias']
  elif edit == 'extra':
    state['AuxLogits.fc.weight'] = np.zeros((1008, 768), np.float32)
  elif edit == 'extra_counter':
    state['Mixed_5b.branch9.bn.num_batches_tracked'] = np.zeros((), np.int64)
  else:
    state['Mixed_5b.branch_pool.conv.weight'] = np.zeros((64, 192, 1, 1), np.float32)
  with pytest.raises(ValueError, match=re.escape(message)):
    load_fid_inception(_write(state, tmp_path))


# ------------------------------------------------------ building blocks against torch ops


@pytest.mark.parametrize('in_hw, out_hw', [((72, 88), (299, 299)), ((400, 320), (299, 299)),
                                           ((299, 299), (299, 299)), ((5, 7), (3, 11))])
def test_resize_matches_torch_interpolate(in_hw, out_hw):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).standard_normal((2, *in_hw, 3)).astype(np.float32)
  # torch in float64: its float32 kernel is itself off by up to 1.5e-4 here (400 -> 299).
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2), size=out_hw, mode='bilinear',
      align_corners=False)
  got = resize_bilinear_like_torch(x, *out_hw)
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_pools_match_torch():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  x = np.random.default_rng(1).standard_normal((2, 9, 8, 4)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)

  def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()

  np.testing.assert_allclose(
      _avg_pool_3x3_same(x),
      nhwc(F.avg_pool2d(xt, 3, stride=1, padding=1, count_include_pad=False)), rtol=1e-6)
  # All-negative input: a pool that let padded zeros win would show it.
  neg = -np.abs(x) - 1.0
  np.testing.assert_array_equal(
      _max_pool_3x3(neg, 1),
      nhwc(F.max_pool2d(torch.from_numpy(neg).permute(0, 3, 1, 2), 3, stride=1, padding=1)))
  np.testing.assert_array_equal(_max_pool_3x3(x, 2), nhwc(F.max_pool2d(xt, 3, stride=2)))
