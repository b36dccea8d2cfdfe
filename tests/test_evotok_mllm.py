"""EvoTok's unified MLLM: the depth transformer against the authors' definition (fixture
tests/fixtures/make_depth_transformer_fixture.py), its sampling, the loss, and the tiny
system end to end (`python -m unimm_jax.main --config=configs/evotok_mllm.py:tiny`)."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (FAST_COMPILE, assert_exact_losses_match, assert_resumes_bit_identically,
                      check_chat_and_generate, read_metrics, run_main)
from unimm_jax import config_defaults
from unimm_jax.convert import evotok_weights
from unimm_jax.models.depth_transformer import DepthTransformer
from unimm_jax.train import trainer
from unimm_jax.train.tasks.mllm import shifted_targets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REFERENCE = dict(np.load(os.path.join(FIXTURES, "depth_transformer_reference.npz")))
STATE_DICT = os.path.join(FIXTURES, "depth_transformer_state_dict.safetensors")
TINY = "configs/evotok_mllm.py:tiny"
NO_GENERATION = ("--config.eval.num_answers=0", "--config.eval.num_generations=0")


def _fixture_head() -> DepthTransformer:
  """The fixture's dims: depth 3, K 16, width 32, 4 heads, 2 layers."""
  return DepthTransformer(depth=3, codebook_size=16, width=32, num_heads=4, num_layers=2)


def test_depth_transformer_matches_the_authors_teacher_forced():
  """Their RQTransformer.forward(hidden, codes): depth 1 reads the hidden state, depth i the
  partial sum of the codes before it, each depth its own classifier."""
  head = _fixture_head()
  params = evotok_weights.load_depth_transformer(STATE_DICT, head)
  code_embeds = np.stack([REFERENCE["codebooks"][d][REFERENCE["codes"][..., d]]
                          for d in range(3)], axis=-2)
  with jax.default_matmul_precision("highest"):
    got = head.apply({"params": params}, REFERENCE["hidden"], code_embeds)
  np.testing.assert_allclose(np.asarray(got), REFERENCE["logits"], atol=2e-5, rtol=2e-5)


def test_depth_transformer_import_refuses_a_wrong_head():
  wrong = DepthTransformer(depth=3, codebook_size=16, width=32, num_heads=4, num_layers=3)
  with pytest.raises(ValueError, match="head_transformer.blocks.2"):
    evotok_weights.load_depth_transformer(STATE_DICT, wrong)


@pytest.fixture(scope="module")
def fixture_system():
  """A tiny EvoTok MLLM whose head and first three pixel codebooks are the fixture's (LLM
  width 24, L_pix 3 of 16 codes of 8 dims), with its frozen tokenizer variables."""
  config = config_defaults.load_config(TINY)
  config.model.update(hidden_size=24, num_heads=4, num_kv_heads=2)
  config.vq.update(pixel_depth=3)
  config.depth_head.update(width=32, num_heads=4, num_layers=2)
  setup = trainer.Setup(config)
  system = setup.task.system
  frozen = jax.device_get(system.load_frozen())
  books = frozen["vq"]["quantizer_state"]["quantizer"]["codebooks"]
  books = np.array(books)
  books[:3] = REFERENCE["codebooks"]
  frozen["vq"]["quantizer_state"]["quantizer"]["codebooks"] = books
  params = {"depth_head": evotok_weights.load_depth_transformer(STATE_DICT, system.depth_head)}
  return system, params, frozen


def test_cfg_sampling_matches_the_authors_generate(fixture_system):
  """Their generate (with an argmax sampler): CFG on every depth's logits, both streams fed
  the conditional stream's codes; greedy here is temperature 0."""
  system, params, frozen = fixture_system
  hidden = REFERENCE["gen_hidden"][:, 0]
  with jax.default_matmul_precision("highest"):
    codes = system.sample_codes(params, frozen, [hidden[:2], hidden[2:]], jax.random.key(0),
                                cfg_scale=float(REFERENCE["cfg_scale"]), temperature=0.0,
                                top_k=None, top_p=None)
    summed = system.vq.apply(frozen["vq"], codes, method="pixel_code_embeddings").sum(1)
  np.testing.assert_array_equal(np.asarray(codes), REFERENCE["gen_codes"][:, 0])
  np.testing.assert_allclose(np.asarray(summed), REFERENCE["gen_features"][:, 0], atol=1e-5)


def test_cfg_scale_one_equals_the_conditional_stream(fixture_system):
  """Greedy image steps with CFG scale 1 and an unconditional stream give what the
  conditional stream gives alone: codes, state and the next LLM input."""
  system, params, frozen = fixture_system
  rng = np.random.default_rng(0)
  params = {**params, "gen_projector": system.gen_projector.init(
      jax.random.key(1), jnp.zeros((1, 8)))["params"]}
  cond, uncond = (rng.standard_normal((2, 24)).astype(np.float32) for _ in range(2))
  outs = []
  for streams in ([cond, uncond], [cond]):
    step_fn, state, n = system.image_step(params, frozen, cfg_scale=1.0, temperature=0.0,
                                          top_k=None, top_p=None, batch_size=2)
    outs.append(step_fn(streams, state, jax.random.key(0), jnp.int32(3)))
  for with_uncond, alone in zip(*outs):
    np.testing.assert_array_equal(np.asarray(with_uncond), np.asarray(alone))
  assert n == 16 and outs[0][2].shape == (2, 16, 3)
  assert (np.asarray(outs[0][2])[:, 3] >= 0).all() and not np.asarray(outs[0][2])[:, 4].any()
  # With guidance the unconditional stream changes the choice somewhere.
  step_fn, state, _ = system.image_step(params, frozen, cfg_scale=5.0, temperature=0.0,
                                        top_k=None, top_p=None, batch_size=2)
  guided = step_fn([cond, uncond], state, jax.random.key(0), jnp.int32(3))[2]
  assert (np.asarray(guided) != np.asarray(outs[0][2])).any()


@pytest.fixture(scope="module")
def tiny_setup():
  config = config_defaults.load_config(TINY)
  setup = trainer.Setup(config)
  state = setup.init_state(FAST_COMPILE)
  batch = next(setup.task.train_iterator(0))
  batch = {k: v for k, v in batch.items() if k != "skipped"}
  return setup, state, batch


def test_text_ce_leaves_out_code_slots_and_image_ce_covers_them(tiny_setup):
  """The LM head is trained on text targets only (the code slots' ids are pad); the head's
  cross entropy is the mean over every code target and depth, near log K at init."""
  setup, state, batch = tiny_setup
  task, system = setup.task, setup.task.system
  frozen = jax.device_get(task.load_frozen())
  terms, stats = jax.jit(lambda p, f, b: task._terms(p, f, b, jax.random.key(0), train=False))(
      state.params, frozen, batch)
  embedded = system.embed(state.params, frozen, batch, train=False, rng=None)
  hidden = system.llm.apply({"params": state.params["llm"]}, inputs_embeds=embedded.embeds,
                            positions=batch["positions"], segment_ids=batch["segment_ids"],
                            method=system.llm.hidden_states)
  logits = system.llm.apply({"params": state.params["llm"]}, hidden, method=system.llm.logits)
  targets = np.asarray(shifted_targets(jnp.asarray(batch["tokens"])))
  next_code = np.asarray(shifted_targets(jnp.asarray(batch["discrete_index"]))) >= 0
  text = (batch["loss_mask"] > 0) & ~next_code
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  want = -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0][text].mean()
  np.testing.assert_allclose(float(terms["ce"]), want, rtol=1e-4)
  assert ((batch["loss_mask"] > 0) & next_code).sum() > 0  # the batch has code targets
  assert float(stats["image_tokens"]) == 0.0
  np.testing.assert_allclose(float(terms["image_ce"]), np.log(16), atol=0.5)


def test_stages_build_and_gen_pretrain_trains_projector_head_and_embedding():
  config = config_defaults.load_config(TINY + ",gen_pretrain")
  setup = trainer.Setup(config)
  state = setup.abstract_state
  assert sorted(state.params) == ["depth_head", "gen_projector", "llm"]
  frozen, _ = setup.task.optimizer.frozen((state.params, None))
  flat = flax.traverse_util.flatten_dict(frozen, sep="/")
  trained = sorted({p.split("/")[0] + ("/embed_tokens" if "embed_tokens" in p else "")
                    for p, f in flat.items() if not f})
  assert trained == ["depth_head", "gen_projector", "llm/embed_tokens"]
  und = trainer.Setup(config_defaults.load_config(TINY + ",und_pretrain"))
  assert sorted(und.abstract_state.params) == ["llm", "projector"]
  for stage in ("und_sft", "gen_sft", "joint"):  # each builds and passes its start-up checks
    trainer.Setup(config_defaults.load_config(f"{TINY},{stage}"))
  config = config_defaults.load_config(TINY + ",und_pretrain")
  config.data.generation_weight = 1.0
  with pytest.raises(ValueError, match="generation_weight=1.0, but config.system.mode"):
    trainer.Setup(config)


# ---- end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evotok_mllm_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("evotok_mllm_run")
  return workdir, run_main(workdir, config=TINY)


@pytest.mark.e2e
def test_run_logs_both_losses_evaluates_and_checkpoints(evotok_mllm_run):
  workdir, proc = evotok_mllm_run
  metrics = read_metrics(workdir)
  for key in ("loss", "loss/ce", "loss/image_ce", "eval/loss", "eval/image_ce",
              "eval/accuracy/all", "eval/generation_check"):
    assert key in metrics[4], key
  assert metrics[4]["loss/image_ce"] < metrics[1]["loss/image_ce"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert "held-out answer accuracy / generation check at step 4" in proc.stdout


@pytest.mark.e2e
def test_eight_devices_match_one(evotok_mllm_run, tmp_path):
  workdir, _ = evotok_mllm_run
  run_main(tmp_path, "--config.mesh.data=4", "--config.mesh.fsdp=2", *NO_GENERATION,
           config=TINY, devices=8)
  one, eight = read_metrics(workdir), read_metrics(tmp_path)
  assert_exact_losses_match(eight, one)


@pytest.mark.e2e
def test_resume_is_bit_identical(evotok_mllm_run, tmp_path):
  """A copy of the run without its step-4 checkpoint resumes from step 2 to the same state."""
  assert_resumes_bit_identically(evotok_mllm_run[0], tmp_path, *NO_GENERATION, config=TINY)


@pytest.mark.e2e
def test_chat_and_generate_modes(evotok_mllm_run, tmp_path):
  check_chat_and_generate(evotok_mllm_run[0], tmp_path, "--cfg_scale=2", "--top_k=4",
                          "--top_p=0.9")


def test_generation_loop_feeds_the_projected_codes(fixture_system):
  """One image step's next LLM input is gen_projector(sum of the sampled codes' rows)."""
  system, params, frozen = fixture_system
  params = {**params, "gen_projector": system.gen_projector.init(
      jax.random.key(1), jnp.zeros((1, 8)))["params"]}
  hidden = [np.random.default_rng(1).standard_normal((2, 24)).astype(np.float32)]
  step_fn, state, _ = system.image_step(params, frozen, cfg_scale=1.0, temperature=0.0,
                                        top_k=None, top_p=None, batch_size=2)
  token, fed, state, done = step_fn(hidden, state, jax.random.key(0), jnp.int32(0))
  codes = np.asarray(state)[:, 0]
  rows = system.vq.apply(frozen["vq"], codes, method="pixel_code_embeddings").sum(1)
  want = system.gen_projector.apply({"params": params["gen_projector"]}, rows)
  np.testing.assert_allclose(np.asarray(fed), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert (np.asarray(token) == codes[:, 0]).all() and not np.asarray(done).any()
