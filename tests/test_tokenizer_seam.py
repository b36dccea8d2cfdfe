"""The tokenizer seam: any tokenizer in the spec table trains on the one tokenizer task.

A continuous toy tokenizer (no codes, its own loss term) with a training-only module (one
more term, a frozen network of its own) is registered in `systems.tokenizers.TOKENIZERS` for
these tests only; the task, the trainer and the weights check never name it. UniWeTok's
terms are checked by name too.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import config_defaults
from unimm_jax.models.tokenizer_interface import TokenizerOutput, TrainingModule
from unimm_jax.systems import tokenizers
from unimm_jax.train import trainer


class PatchAutoencoder(nn.Module):
  """4x4 patches -> 8 continuous channels -> pixels; loss term `latent_l2`."""
  config: object

  def setup(self):
    self.enc, self.dec = nn.Dense(8), nn.Dense(48)

  def encode(self, images, *, train=False):
    del train
    b, h, w, c = images.shape
    patches = images.reshape(b, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 2, 4, 5)
    z = self.enc(patches.reshape(b, h // 4, w // 4, 48))
    return TokenizerOutput(recon=None, codes=None, latents=z,
                           losses={"latent_l2": jnp.mean(jnp.square(z))},
                           stats={"latent_std": jnp.std(z)}, features={"pre": z})

  def decode(self, latents, *, train=False):
    del train
    b, h, w, _ = latents.shape
    patches = self.dec(latents).reshape(b, h, w, 4, 4, 3)
    return patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, 4 * h, 4 * w, 3)

  def __call__(self, images, *, train):
    out = self.encode(images, train=train)
    return out.replace(recon=self.decode(out.latents, train=train))


class LatentProbe(TrainingModule):
  """Regresses a frozen random projection of the images from the features: term `probe`."""
  name = "probe"

  def init(self, rng, out, images):
    return nn.Dense(3).init(rng, jnp.zeros(out.features["pre"].shape))["params"]

  def __call__(self, params, out, images, frozen, rng):
    pred = nn.Dense(3).apply({"params": params}, out.features["pre"])
    target = jnp.einsum("bhwc,cd->bd", images, frozen["projection"])[:, None, None, :]
    return {"probe": jnp.mean(jnp.square(pred - target))}, {"probe_target": jnp.mean(target)}

  def frozen_shapes(self, images):
    return {"projection": jax.ShapeDtypeStruct((3, 3), jnp.float32)}

  def load_frozen(self):
    return {"projection": np.eye(3, dtype=np.float32)}


@pytest.fixture
def toy_spec(monkeypatch):
  spec = tokenizers.TokenizerSpec(
      build=PatchAutoencoder, downsample_factor=lambda m: 4, code_layout=lambda m: None,
      training_modules=lambda config: [LatentProbe()] if config.loss.probe else [])
  monkeypatch.setitem(tokenizers.TOKENIZERS, "toy_continuous", spec)


def _toy_config(**loss):
  config = config_defaults.load_config("configs/uniwetok.py:tiny")
  config.model.name = "toy_continuous"
  config.loss = dict(l1=1.0, l2=0.0, perceptual=0.0, gan=0.0, latent_l2=0.01, probe=0.5)
  config.loss.update(loss)
  return config


def test_a_continuous_tokenizer_with_a_training_module_trains(toy_spec):
  del toy_spec
  setup = trainer.Setup(_toy_config())
  state = setup.init_state()
  images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  with setup.activate():
    new, metrics = setup.compile_train_step()(state, setup.frozen,
                                             {"image": setup.global_images(images, True)},
                                             setup.train_rng)
  metrics = jax.device_get(metrics)
  for name in ("l1", "l2", "latent_l2", "probe", "latent_std", "probe_target"):
    assert np.isfinite(metrics[name]), name
  want = metrics["l1"] + 0.01 * metrics["latent_l2"] + 0.5 * metrics["probe"]
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
  assert set(new.module_params) == {"probe"}
  assert int(new.step) == 1


def test_a_term_without_a_weight_is_refused_by_name(toy_spec):
  del toy_spec
  config = _toy_config()
  del config.loss["latent_l2"]
  with pytest.raises(ValueError, match=r"loss term 'latent_l2' has no weight: add "
                                       r"config.loss.latent_l2"):
    trainer.Setup(config)


def test_a_weight_without_a_term_is_refused_by_name(toy_spec):
  del toy_spec
  with pytest.raises(ValueError, match=r"config.loss.commitment=0.25 weights a term nothing "
                                       r"produces"):
    trainer.Setup(_toy_config(commitment=0.25))
  # A zero weight is an off switch: the probe module is not built and nothing is refused.
  trainer.Setup(_toy_config(probe=0.0))


def test_uniwetok_terms_have_weights():
  config = config_defaults.load_config("configs/uniwetok.py:tiny")
  setup = trainer.Setup(config)
  assert setup.task.layout.codes_per_token == 4 and setup.task.layout.codebook_size == 16
  config.loss.entropy_bonus = 1.0
  with pytest.raises(ValueError, match=r"config.loss.entropy_bonus=1.0 weights a term nothing "
                                       r"produces \(produced: \['commitment', 'entropy', 'l1', "
                                       r"'l2'\]\)"):
    trainer.Setup(config)
