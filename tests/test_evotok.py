"""EvoTok: the authors' weights give their outputs; the tokenizer trains, with its EMA
codebooks carried, checkpointed and resumed bit-identically; every named config trains.

The reference is tests/fixtures/make_evotok_fixture.py: their own model definition, tiny and
random (see its docstring for the sizes and stand-ins).
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import (EVOTOK_TINY, _saved_state_arrays, assert_resumes_bit_identically,
                      evotok_teacher_flags, read_metrics, run_main, train_steps_in_process)
from unimm_jax import config_defaults
from unimm_jax.convert import evotok_weights
from unimm_jax.inference import image_codec
from unimm_jax.inference.tokenizer_run import load_tokenizer_run
from unimm_jax.models.evotok import EvoTok
from unimm_jax.quantizers.residual_quantizer import ResidualQuantizer
from unimm_jax.train import from_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
STATE_DICT = os.path.join(FIXTURES, "evotok_tiny_state_dict.safetensors")
REFERENCE = np.load(os.path.join(FIXTURES, "evotok_tiny_reference.npz"))
TINY = EVOTOK_TINY


def fixture_model_config() -> ml_collections.ConfigDict:
  """configs/evotok.py's model fields at the fixture's sizes (its `config` entry)."""
  ref = json.loads(str(REFERENCE["config"]))
  args, sem, siglip = ref["model_args"], ref["semantic_decoder"], ref["siglip"]
  cfg = config_defaults.load_config(TINY).model
  cfg.update(dict(code_dim=args["codebook_embed_dim"], num_levels=args["vqkd_depth"],
                  codebook_size=args["codebook_size"], pixel_depth=args["vqgan_depth"],
                  semantic_depth=args["vqkd_depth"], vq_warmup=args["vq_warmup"],
                  dead_code_threshold=0.0, decay=ref["ema_decay"]))
  cfg.encoder.update(dict(
      hidden_size=siglip["hidden_size"], num_layers=siglip["num_hidden_layers"],
      num_heads=siglip["num_attention_heads"], mlp_dim=siglip["intermediate_size"],
      patch_size=siglip["patch_size"], image_size=siglip["image_size"]))
  cfg.semantic.update(dict(width=sem["embed_dim"], depth=sem["depth"],
                           num_heads=sem["num_heads"], mlp_ratio=4,
                           out_width=ref["decoder_out_dim"]))
  cfg.decoder.update(dict(ch=ref["decoder_args"]["ch"], ch_mult=tuple(args["decoder_ch_mult"]),
                          num_res_blocks=ref["decoder_args"]["num_res_blocks"],
                          z_channels=args["z_channels"]))
  return cfg


@pytest.fixture(scope="module")
def imported():
  cfg = fixture_model_config()
  return cfg, evotok_weights.load_evotok_state_dict(STATE_DICT, cfg)


def test_authors_weights_give_their_outputs(imported):
  cfg, variables = imported
  model = EvoTok(cfg)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, REFERENCE["images"])
  np.testing.assert_allclose(out.features["pre_quant"], REFERENCE["features"], atol=2e-5)
  np.testing.assert_array_equal(out.codes, REFERENCE["codes"])
  np.testing.assert_allclose(out.latents, REFERENCE["quant_pix"], atol=2e-5)
  np.testing.assert_allclose(out.features["semantic_latents"], REFERENCE["quant_sem"],
                             atol=2e-5)
  np.testing.assert_allclose(out.losses["commitment"], REFERENCE["commitment"], rtol=1e-5)
  np.testing.assert_allclose(out.recon, REFERENCE["recon"], atol=1e-4)
  np.testing.assert_allclose(out.features["semantic"], REFERENCE["semantic"], atol=1e-4)
  # The codes' first L_pix levels give f_pix back, and decoded, the image.
  np.testing.assert_allclose(
      model.apply(variables, out.codes, method="codes_to_quantized"), REFERENCE["quant_pix"],
      atol=1e-6)
  decoded = jax.jit(image_codec.decode(model))(variables, out.codes)
  np.testing.assert_allclose(decoded, np.clip(REFERENCE["recon"], -1, 1), atol=1e-4)


def test_ema_codebook_update_matches_theirs(imported):
  """Two training steps of their quantizer (restarts off, warm-up 1) from the imported
  buffers: codes of each step, then cluster sizes, embedding sums and codebooks."""
  cfg, variables = imported
  quantizer = ResidualQuantizer(
      num_levels=cfg.num_levels, codebook_size=cfg.codebook_size, code_dim=cfg.code_dim,
      partial_depths=(cfg.pixel_depth, cfg.semantic_depth), decay=cfg.decay,
      vq_warmup=cfg.vq_warmup, dead_code_threshold=0.0, chunk_size=cfg.codebook_size)
  step = jax.jit(lambda state, x: quantizer.apply(
      {"quantizer_state": state}, x, train=True, rngs={"codebook_restart": jax.random.key(0)},
      mutable=["quantizer_state"]))
  state = variables["quantizer_state"]["quantizer"]
  for n in (1, 2):
    (_, codes, _, _), updated = step(state, REFERENCE["features"])
    np.testing.assert_array_equal(codes, REFERENCE[f"train_codes_step{n}"])
    state = updated["quantizer_state"]
  assert int(state["step"]) == int(variables["quantizer_state"]["quantizer"]["step"]) + 2
  np.testing.assert_allclose(state["cluster_size"], REFERENCE["train_cluster_size_ema"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["embed_sum"], REFERENCE["train_embed_ema"], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(state["codebooks"], REFERENCE["train_codebooks"], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("field, value, needle", [
    ("num_levels", 5, "quantize.codebooks.4.weight"),
    ("codebook_size", 32, "quantize.codebooks.0.weight"),
    ("encoder.num_layers", 4, "encoder.layers.3"),
])
def test_a_checkpoint_that_does_not_fit_names_the_tensor(field, value, needle):
  cfg = fixture_model_config()
  cfg.semantic_depth = min(cfg.semantic_depth, cfg.num_levels)
  section, _, name = field.rpartition(".")
  (cfg[section] if section else cfg)[name] = value
  with pytest.raises(ValueError, match=needle):
    evotok_weights.load_evotok_state_dict(STATE_DICT, cfg)


def test_import_mode_writes_a_run_that_encodes_like_theirs(tmp_path):
  """`--mode=import` through the spec: step 0 of a workdir holding their params and EMA
  codebooks; the restored tokenizer gives their codes."""
  config = config_defaults.load_config(TINY)
  config.model = fixture_model_config()
  from_checkpoint.import_weights(config, str(tmp_path), STATE_DICT)
  model, variables, _ = load_tokenizer_run(str(tmp_path))
  np.testing.assert_array_equal(
      jax.jit(image_codec.encode(model))(variables, REFERENCE["images"]), REFERENCE["codes"])


@pytest.mark.e2e
def test_run_logs_every_term_and_updates_the_codebooks(evotok_run):
  workdir, proc = evotok_run
  assert "params ['encoder'] start from pretrained weights" in proc.stderr
  logged = read_metrics(workdir)[4]
  for name in ("l2", "commitment", "semantic", "semantic_fold", "loss", "quantization_mse",
               "dead_codes_restarted"):
    assert name in logged and np.isfinite(logged[name]), name
  first, last = (_saved_state_arrays(workdir, s) for s in (2, 4))
  key = "['model_state']['quantizer_state']['quantizer']['step']"
  assert (int(first[key]), int(last[key])) == (2, 4)
  books = key.replace("'step'", "'codebooks'")
  assert not np.array_equal(first[books], last[books])


@pytest.mark.e2e
def test_resume_is_bit_identical_codebooks_included(evotok_run, evotok_teacher, tmp_path):
  """A copy of the run without its step-4 checkpoint resumes from step 2 to the same state."""
  workdir = assert_resumes_bit_identically(evotok_run[0], tmp_path,
                                           *evotok_teacher_flags(evotok_teacher), config=TINY)
  assert any("quantizer_state" in k for k in _saved_state_arrays(workdir, 4))


@pytest.mark.e2e
def test_eval_mode_reports_the_residual_trajectory(evotok_run, evotok_teacher):
  """Fig. 5b: reconstruction metrics and the semantic cosine for every depth d = 1..L."""
  workdir, _ = evotok_run
  run_main(workdir, *evotok_teacher_flags(evotok_teacher), "--config.eval.num_images=8",
           "--config.eval.batch_size=8", config=TINY, mode="eval")
  with open(os.path.join(workdir, "eval_4.json")) as f:
    trajectory = json.load(f)["trajectory"]
  levels = config_defaults.load_config(TINY).model.num_levels
  assert [t["depth"] for t in trajectory] == list(range(1, levels + 1))
  for entry in trajectory:
    assert np.isfinite(entry["psnr"]) and -1.0 <= entry["feature_cosine"] <= 1.0
  assert os.path.getsize(os.path.join(workdir, "eval_4_trajectory.png")) > 0


@pytest.mark.e2e
def test_trained_run_encodes_and_decodes_with_its_codebooks(evotok_run):
  model, variables, config = load_tokenizer_run(str(evotok_run[0]))
  assert set(variables) == {"params", "quantizer_state"}
  assert int(variables["quantizer_state"]["quantizer"]["step"]) == 4
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  codes = jax.jit(image_codec.encode(model))(variables, images)
  assert codes.shape == (2, 4, 4, config.model.num_levels)
  np.testing.assert_array_equal(codes, out.codes)
  decoded = jax.jit(image_codec.decode(model))(variables, codes)
  np.testing.assert_allclose(decoded, jnp.clip(out.recon, -1, 1), atol=1e-5)


TABLE_ROWS = ("table4_row1", "table4_row2", "table4_row3", "table5_row1", "table5_row2",
              "table5_row3", "table5_row4")


def test_table_rows_set_the_papers_depths_and_decouplings():
  """At 16 levels (paper): Table 4's (L_pix, L_sem); Table 5's rows 1 and 4 are Table 4's
  rows 1 and 3, rows 2-3 quantize 4 pixel and 16 semantic levels separately."""
  want = {"table4_row1": (4, 4, 16, "evolution"), "table4_row2": (16, 4, 16, "evolution"),
          "table4_row3": (4, 16, 16, "evolution"), "table5_row1": (4, 4, 16, "evolution"),
          "table5_row2": (4, 16, 20, "layer"), "table5_row3": (4, 16, 20, "branch"),
          "table5_row4": (4, 16, 16, "evolution")}
  for row, expected in want.items():
    m = config_defaults.load_config(f"configs/evotok.py:paper,{row}").model
    assert (m.pixel_depth, m.semantic_depth, m.num_levels, m.decoupling) == expected, row


def _distinct_rows() -> list[tuple[str, ...]]:
  groups = {}
  for row in TABLE_ROWS:
    groups.setdefault(config_defaults.load_config(f"{TINY},{row}").to_json(), []).append(row)
  return [tuple(rows) for rows in groups.values()]


@pytest.mark.parametrize("rows", _distinct_rows(), ids="=".join)
def test_table_rows_train_at_tiny_size(rows):
  config = config_defaults.load_config(f"{TINY},{rows[0]}")
  state, metrics = train_steps_in_process(config, 1)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  quantizers = state.model_state["quantizer_state"]
  assert len(quantizers) == (1 if config.model.decoupling == "evolution" else 2)
  for books in quantizers.values():
    assert int(books["step"]) == 1
