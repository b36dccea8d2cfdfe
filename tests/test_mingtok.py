"""MingTok: the authors' weights give their outputs (latents at any size, semantic features,
pixels); the semantic decoder decodes one token at a time with a KV cache as it does the whole
sequence; masked feature prediction against two teachers trains, resumes bit-identically and
every named config trains; --mode=import / encode / decode run through the tokenizer spec.

The reference is tests/fixtures/make_mingtok_fixture.py: their own model definition, tiny and
random (see its docstring for the sizes).
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import (_saved_state_arrays, assert_resumes_bit_identically, read_metrics, run_main,
                      train_steps_in_process)
from unimm_jax import config_defaults
from unimm_jax.convert import mingtok_weights
from unimm_jax.data import pipeline
from unimm_jax.inference import image_codec
from unimm_jax.inference import restore
from unimm_jax.inference.tokenizer_run import load_matching_run, load_tokenizer_run
from unimm_jax.losses import distillation
from unimm_jax.models import mingtok
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel.context import MeshContext
from unimm_jax.train import from_checkpoint
from unimm_jax.train import tasks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
STATE_DICT = os.path.join(FIXTURES, "mingtok_tiny_state_dict.safetensors")
REFERENCE = np.load(os.path.join(FIXTURES, "mingtok_tiny_reference.npz"))
TINY = "configs/mingtok.py:tiny"
ATOL = 1e-4


def fixture_model_config() -> ml_collections.ConfigDict:
  """configs/mingtok.py's model fields at the fixture's sizes (its `config` entry)."""
  ref = json.loads(str(REFERENCE["config"]))
  enc, sem, pix = ref["low_level_encoder"], ref["semantic_decoder"], ref["pixel_decoder"]
  cfg = config_defaults.load_config(TINY).model
  cfg.update(dict(image_size=enc["img_size"], latent_dim=enc["out_dim"],
                  latent_mean=ref["mean"], latent_scale=ref["scaling_factor"]))
  cfg.encoder.update(dict(width=enc["embed_dim"], depth=enc["depth"],
                          patch_size=enc["patch_size"]))
  cfg.semantic.update(dict(width=sem["embed_dim"], depth=sem["decoder_depth"]))
  cfg.pixel.update(dict(width=pix["embed_dim"], depth=pix["decoder_depth"],
                        patch_size=pix["patch_size"]))
  return cfg


@pytest.fixture(scope="module")
def imported():
  cfg = fixture_model_config()
  return mingtok.MingTok(cfg), {"params": mingtok_weights.load_mingtok_state_dict(STATE_DICT,
                                                                                    cfg)}


@pytest.mark.parity
def test_authors_weights_give_their_latents_features_and_pixels(imported):
  model, variables = imported
  out = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, REFERENCE["images"])
  np.testing.assert_allclose(out.latents, REFERENCE["latent"], atol=ATOL, rtol=0)
  features = jax.jit(lambda v, z: model.apply(v, z, method="semantic_features"))(
      variables, out.latents)
  np.testing.assert_allclose(features, REFERENCE["semantic"], atol=ATOL, rtol=0)
  recon = jax.jit(lambda v, x: model.apply(v, x, train=False).recon)(variables,
                                                                      REFERENCE["images"])
  np.testing.assert_allclose(recon, REFERENCE["recon"], atol=ATOL, rtol=0)
  decoded = jax.jit(image_codec.decode(model, continuous=True))(variables, REFERENCE["latent"])
  np.testing.assert_allclose(decoded, REFERENCE["recon"], atol=ATOL, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("size", ["96", "64x96"])
def test_positions_resize_as_theirs_at_other_sizes(imported, size):
  """Bicubic with DINOv2's scale factor (g + 0.1) / M, rows = height (non-square too)."""
  model, variables = imported
  latents = jax.jit(lambda v, x: model.apply(v, x, method="encode").latents)(
      variables, REFERENCE[f"images_{size}"])
  np.testing.assert_allclose(latents, REFERENCE[f"latent_{size}"], atol=ATOL, rtol=0)
  grid = REFERENCE[f"latent_{size}"].shape[1:3]
  table = variables["params"]["encoder"]["position_embedding"]
  positions = mingtok.LowLevelEncoder._positions(table, 4, grid, grid[0] == grid[1])  # pylint: disable=protected-access
  np.testing.assert_allclose(positions, REFERENCE[f"pos_{size}"], atol=1e-5, rtol=0)


def test_semantic_decoder_one_token_at_a_time_equals_the_whole_sequence(imported):
  """The generation path: a KV cache, one latent per call, gives the parallel features (and
  their cached decoder's)."""
  model, variables = imported
  cfg = fixture_model_config()
  latents = jnp.asarray(REFERENCE["latent"]).reshape(3, 16, cfg.latent_dim)
  whole = model.apply(variables, latents, method="semantic_features")

  @jax.jit
  def step(cache, token):
    return model.apply(variables, token, cache, method="semantic_features")

  cache = mingtok.init_semantic_cache(cfg, 3, 16)
  steps = []
  for i in range(16):
    features, cache = step(cache, latents[:, i:i + 1])
    steps.append(features)
  steps = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(steps, whole, atol=1e-5, rtol=0)
  np.testing.assert_allclose(steps, REFERENCE["semantic_incremental"], atol=ATOL, rtol=0)
  assert int(cache.index) == 16
  # Two tokens at a time continue the cache the same way.
  cache = mingtok.init_semantic_cache(cfg, 3, 16)
  pairs = []
  for i in range(0, 16, 2):
    features, cache = step(cache, latents[:, i:i + 2])
    pairs.append(features)
  np.testing.assert_allclose(np.concatenate(pairs, axis=1), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("field, value, needle", [
    ("semantic.depth", 3, "semantic_decoder.blocks.0.2.norm1.weight"),
    ("encoder.width", 192, "low_level_encoder"),
    ("latent_dim", 16, "low_level_encoder.out_proj"),
])
def test_a_checkpoint_that_does_not_fit_names_the_tensor(field, value, needle):
  cfg = fixture_model_config()
  section, _, key = field.rpartition(".")
  (cfg[section] if section else cfg)[key] = value
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    mingtok_weights.load_mingtok_state_dict(STATE_DICT, cfg)


def test_token_mask_counts_and_fraction():
  mask = np.asarray(mingtok.sample_token_mask(jax.random.key(0), 400, 16, 0.5, 0.25))
  per_image = mask.sum(1)
  assert set(per_image.tolist()) <= {0, 8}
  assert 0.18 < np.mean(per_image == 8) < 0.32
  assert not mingtok.sample_token_mask(jax.random.key(1), 4, 16, 0.5, 0.0).any()


def test_masked_cosine_loss_counts_only_masked_tokens():
  rng = np.random.default_rng(0)
  student, teacher = rng.standard_normal((2, 2, 5, 3)).astype(np.float32)
  weights = np.array([[1, 0, 0, 1, 0], [0, 0, 0, 0, 1]], np.float32)
  cos = np.sum(student * teacher, -1) / (np.linalg.norm(student, axis=-1)
                                         * np.linalg.norm(teacher, axis=-1))
  expected = np.sum(weights * (1 - cos)) / 3
  np.testing.assert_allclose(distillation.masked_cosine_loss(student, teacher, weights),
                             expected, rtol=1e-6)
  assert float(distillation.masked_cosine_loss(student, teacher, 0 * weights)) == 0.0


# ------------------------------------------------------------------ training with teachers

@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Tiny DINOv2 (the latents' teacher, width 48) and CLIP (the semantic features', width 40)
  written by transformers, both 32 px with patch 8: the 4 x 4 grid of tiny MingTok."""
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("mingtok_teachers")
  transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
      image_size=32, patch_size=8)).save_pretrained(root / "dinov2")
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
      image_size=32, patch_size=8)).save_pretrained(root / "clip")
  return str(root / "dinov2"), str(root / "clip")


def teacher_flags(teachers) -> tuple[str, ...]:
  return (f"--config.teacher.path={teachers[0]}",
          f"--config.semantic_teacher.path={teachers[1]}")


def _with_teachers(arg: str, teachers) -> ml_collections.ConfigDict:
  config = config_defaults.load_config(arg)
  if config.loss.latent_prediction:
    config.teacher.path = teachers[0]
  if config.loss.semantic_prediction:
    config.semantic_teacher.path = teachers[1]
  config_defaults.validate(config)
  return config


@pytest.fixture(scope="module")
def mingtok_run(tmp_path_factory, teachers):
  """Tiny MingTok with both feature-prediction terms, 4 steps, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("mingtok_run")
  return workdir, run_main(workdir, *teacher_flags(teachers), config=TINY)


@pytest.mark.e2e
def test_run_logs_every_term(mingtok_run):
  workdir, _ = mingtok_run
  logged = read_metrics(workdir)[4]
  for name in ("l1", "latent_prediction", "semantic_prediction", "loss", "masked_tokens",
               "latent_prediction_cosine_all", "semantic_prediction_cosine_all"):
    assert name in logged and np.isfinite(logged[name]), name
  # Half the batch is masked, half of its tokens: about a quarter of all tokens.
  assert 0.0 < np.mean([read_metrics(workdir)[s]["masked_tokens"] for s in (1, 2, 3, 4)]) < 0.6
  state = _saved_state_arrays(workdir, 4)
  assert any("latent_prediction" in k for k in state)
  assert any("semantic_prediction" in k for k in state)


@pytest.mark.e2e
def test_resume_is_bit_identical(mingtok_run, teachers, tmp_path):
  assert_resumes_bit_identically(mingtok_run[0], tmp_path, *teacher_flags(teachers), config=TINY)


@pytest.mark.e2e
def test_encode_writes_normalised_latents_and_decode_renders_them(mingtok_run, tmp_path):
  """--mode=encode: (h', w', 32)-style latents per image, equal to the model's `encode`;
  --mode=decode: PNGs equal to decoding them."""
  workdir, _ = mingtok_run
  images = tmp_path / "images"
  images.mkdir()
  pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
  for i, p in enumerate(pixels):
    Image.fromarray(p).save(images / f"{i}.png")
  run_main(workdir, f"--input={images}", f"--output={tmp_path / 'latents.npz'}", config=None,
           mode="encode")
  model, variables, config = load_tokenizer_run(str(workdir))
  with np.load(tmp_path / "latents.npz") as data:
    assert int(data["latent_dim"]) == config.model.latent_dim
    latents = data["latents_00000"]
  assert latents.shape == (4, 6, config.model.latent_dim)
  expected = jax.jit(image_codec.encode(model))(variables, pixels[:1] / 127.5 - 1.0)[0]
  np.testing.assert_allclose(latents, expected, atol=1e-5)
  run_main(workdir, f"--input={tmp_path / 'latents.npz'}", f"--output={tmp_path / 'out'}",
           config=None, mode="decode")
  decoded = np.asarray(Image.open(tmp_path / "out" / "0.png"))
  rendered = jax.jit(image_codec.decode(model, continuous=True))(variables, latents[None])[0]
  np.testing.assert_allclose(decoded, np.round((np.asarray(rendered) + 1) * 127.5), atol=1)


@pytest.mark.e2e
def test_eval_reports_the_constants_that_normalise_the_latents(mingtok_run):
  """--mode=eval's latent_normalization makes the eval images' latents zero-mean and
  unit-std; a unified system's config.vq may carry those constants (and no other change)."""
  workdir = str(mingtok_run[0])
  config = restore.saved_config(workdir)
  context = MeshContext(mesh_lib.make_mesh(config.mesh), config_defaults.sharding_rules(config))
  results = tasks.build_task(config).evaluate_checkpoint(context, workdir)
  constants = results["latent_normalization"]
  model, variables, _ = load_tokenizer_run(workdir)
  renormalised = config.model.copy_and_resolve_references()
  renormalised.update(constants)
  images = np.concatenate(list(pipeline.iter_eval_batches(
      config.data, config.eval.num_images, config.eval.batch_size)))
  latents = np.asarray(mingtok.MingTok(renormalised).apply(variables, images, method="encode")
                       .latents, np.float64)
  assert abs(latents.mean()) < 1e-4 and abs(latents.std() - 1.0) < 1e-4
  raw = np.asarray(model.apply(variables, images, method="encode").latents)
  np.testing.assert_allclose(raw.mean(), results["latent_mean"], atol=1e-4)
  load_matching_run(workdir, renormalised)
  renormalised.latent_dim += 1
  with pytest.raises(ValueError, match="latent_dim"):
    load_matching_run(workdir, renormalised)


@pytest.mark.e2e
def test_import_mode_writes_a_run_that_encodes_like_theirs(tmp_path):
  config = config_defaults.load_config(TINY)
  config.model = fixture_model_config()
  config.data.image_size = config.model.image_size
  config.loss.latent_prediction = config.loss.semantic_prediction = 0.0  # no teachers here
  from_checkpoint.import_weights(config, str(tmp_path), STATE_DICT)
  model, variables, _ = load_tokenizer_run(str(tmp_path))
  latents = jax.jit(image_codec.encode(model))(variables, REFERENCE["images"])
  np.testing.assert_allclose(latents, REFERENCE["latent"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["no_masking", "latent_only", "semantic_only", "gan"])
def test_every_variant_trains_at_tiny_size(variant, teachers):
  config = _with_teachers(f"{TINY},{variant}", teachers)
  state, metrics = train_steps_in_process(config, 1)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  terms = {t for t in ("latent_prediction", "semantic_prediction") if config.loss[t]}
  assert terms <= set(metrics)
  assert set(state.module_params or {}) == terms
  if variant == "no_masking":
    assert float(metrics["masked_tokens"]) == 0.0


def test_paper_and_demo_configs_match_the_papers_shapes():
  paper = config_defaults.load_config("configs/mingtok.py:paper")
  m = paper.model
  assert (m.image_size, m.encoder.patch_size, m.latent_dim) == (512, 32, 32)
  assert (m.encoder.width, m.encoder.depth, m.semantic.width, m.semantic.depth) == (768, 12,
                                                                                    1024, 24)
  assert (m.pixel.width, m.pixel.depth, m.pixel.patch_size) == (1024, 24, 16)
  assert mingtok.swiglu_hidden(768) == 2048 and mingtok.swiglu_hidden(1024) == 2736
  assert (paper.teacher.image_size // 14) ** 2 == (512 // 32) ** 2 == 256
  demo = config_defaults.load_config("configs/mingtok.py:demo")
  config_defaults.validate(demo)


def test_a_teacher_whose_grid_is_not_the_latents_is_named(teachers):
  config = _with_teachers(TINY, teachers)
  config.teacher.image_size = 48  # DINOv2 resizes its positions: a 6 x 6 grid
  with pytest.raises(ValueError, match="config.teacher.image_size"):
    train_steps_in_process(config, 1)
