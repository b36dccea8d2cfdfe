"""LPIPS (VGG16) against the `lpips` package's own outputs, stored as a fixture.

tests/fixtures/lpips_reference.npz is made by tests/fixtures/make_lpips_fixture.py in a venv
with torch, torchvision and lpips; the weights it used are regenerated here by
tests/lpips_fixture_weights.py and written under the key names and shapes the package's
state dict had, so a wrong name or layout in the loader fails here too.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lpips_fixture_weights
from unimm_jax.evals import lpips as lpips_eval
from unimm_jax.models import lpips as lpips_model

pytestmark = pytest.mark.parity

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'lpips_reference.npz')


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURE, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def state_dict(reference):
  """The package's whole state dict with the fixture's weights, under its own key names."""
  shapes = dict(json.loads(str(reference['state_dict'])))
  scaling = {'scaling_layer.shift': reference['scaling_shift'],
             'scaling_layer.scale': reference['scaling_scale']}
  learned = {k: v for k, v in shapes.items() if k not in scaling}
  tensors = lpips_fixture_weights.random_state_dict(learned, int(reference['seed']))
  tensors.update({k: v.reshape(shapes[k]) for k, v in scaling.items()})
  return tensors


@pytest.fixture(scope='module')
def distance(state_dict, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('lpips') / 'lpips_vgg.safetensors')
  safetensors.numpy.save_file(state_dict, path)
  return lpips_eval.load(path, precision='highest')


def _write(tmp_path, tensors) -> str:
  path = str(tmp_path / 'weights.safetensors')
  safetensors.numpy.save_file(tensors, path)
  return path


def test_matches_lpips_package(reference, state_dict, distance):
  x, y = jnp.asarray(reference['x']), jnp.asarray(reference['y'])
  np.testing.assert_allclose(distance(x, y), reference['distances'], rtol=1e-4, atol=1e-7)
  # Per tap too, so a failure points at the layer where the port departs.
  params = lpips_eval.convert_state_dict(state_dict)
  per_layer = jax.jit(lpips_model.LPIPS(precision='highest').apply, static_argnames='per_layer')(
      {'params': params}, x, y, per_layer=True)
  np.testing.assert_allclose(per_layer, reference['per_layer'], rtol=1e-4, atol=1e-7)


def test_identical_images_give_zero_and_distance_is_symmetric(reference, distance):
  x, y = jnp.asarray(reference['x']), jnp.asarray(reference['y'])
  np.testing.assert_allclose(distance(x, x), 0.0, atol=1e-12)  # rounding only, see LPIPS
  np.testing.assert_allclose(distance(y, x), distance(x, y), rtol=1e-5, atol=1e-8)


def test_the_package_constants_are_the_ones_used(reference):
  np.testing.assert_array_equal(reference['scaling_shift'],
                                np.float32(lpips_model.SHIFT))
  np.testing.assert_array_equal(reference['scaling_scale'],
                                np.float32(lpips_model.SCALE))
  assert set(dict(json.loads(str(reference['state_dict'])))) >= set(lpips_eval.expected_shapes())


def test_no_weights_file_needs_an_explicit_opt_in():
  with pytest.raises(ValueError, match='make_lpips_fixture.py --export-pretrained'):
    lpips_eval.load()
  with pytest.raises(FileNotFoundError, match='export-pretrained'):
    lpips_eval.load('/nonexistent/lpips_vgg.safetensors')
  distance = lpips_eval.load(allow_random=True, seed=3)
  x = jnp.linspace(-1, 1, 2 * 16 * 24 * 3).reshape(2, 16, 24, 3)
  d = np.asarray(distance(x, x[::-1]))
  assert d.shape == (2,) and np.all(np.isfinite(d)) and np.all(d > 0)


@pytest.mark.parametrize('edit, named', [
    (lambda t: t.update({'net.slice3.12.weight': np.zeros((256, 128, 3, 3), np.float32)}),
     'net.slice3.12.weight has shape (256, 128, 3, 3), expected (256, 256, 3, 3)'),
    (lambda t: t.update({'lin2.model.1.weight': np.zeros((1, 128, 1, 1), np.float32)}),
     'lin2.model.1.weight has shape'),
    (lambda t: t.pop('net.slice5.28.bias'), 'missing key net.slice5.28.bias'),
    (lambda t: t.update({'net.slice5.30.weight': np.zeros((1,), np.float32)}),
     'unexpected key net.slice5.30.weight'),
    (lambda t: t.update({'scaling_layer.shift': np.zeros((1, 3, 1, 1), np.float32)}),
     'scaling_layer.shift is'),
    (lambda t: t.update({'lins.1.model.1.weight': np.zeros((1, 128, 1, 1), np.float32)}),
     'lins.1.model.1.weight differs from lin1.model.1.weight'),
])
def test_bad_weights_file_names_the_key(state_dict, tmp_path, edit, named):
  tensors = dict(state_dict)
  edit(tensors)
  with pytest.raises(ValueError, match=re.escape(named)):
    lpips_eval.load(_write(tmp_path, tensors))
