"""Lazy safetensors reading: dtypes (bf16), sharded indices, slices of stacked views."""
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from unimm_jax.convert import hf_checkpoint


def _write_dir(tmp_path, shards: list[dict], config=None):
  (tmp_path / 'config.json').write_text(json.dumps(config or {'model_type': 'test'}))
  if len(shards) == 1:
    save_file(shards[0], str(tmp_path / 'model.safetensors'))
    return tmp_path
  weight_map = {}
  for i, tensors in enumerate(shards):
    name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(tensors, str(tmp_path / name))
    weight_map.update({k: name for k in tensors})
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  return tmp_path


def test_sharded_index_and_views(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((6, 4)).astype(np.float32)
  b = rng.standard_normal((6, 4)).astype(np.float32)
  ckpt = hf_checkpoint.HFCheckpoint(str(_write_dir(tmp_path, [{'l0.w': a}, {'l1.w': b}])))
  assert sorted(ckpt.tensors) == ['l0.w', 'l1.w']
  per_layer = [hf_checkpoint.tensor(ckpt, f'l{i}.w', lambda w: w.T.reshape(4, 2, 3))
               for i in range(2)]
  stacked = hf_checkpoint.stack(per_layer)
  want = np.stack([a.T.reshape(4, 2, 3), b.T.reshape(4, 2, 3)])
  assert stacked.shape == want.shape
  np.testing.assert_array_equal(stacked[()], want)
  index = (slice(1, 2), slice(2, 4), slice(None), slice(0, 2))
  np.testing.assert_array_equal(stacked[index], want[index])
  with pytest.raises(ValueError, match="missing tensor 'l2.w'"):
    hf_checkpoint.tensor(ckpt, 'l2.w')


@pytest.mark.parity
def test_bfloat16_tensors_are_read(tmp_path):
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file as save_torch
  w = torch.randn(3, 5).to(torch.bfloat16)
  (tmp_path / 'config.json').write_text('{}')
  save_torch({'w': w}, str(tmp_path / 'model.safetensors'))
  got = hf_checkpoint.HFCheckpoint(str(tmp_path)).get('w')
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), w.float().numpy())


def test_directory_without_weights_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    hf_checkpoint.HFCheckpoint(str(tmp_path))
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='pickled'):
    hf_checkpoint.HFCheckpoint(str(tmp_path))
