"""Ming-UniVision: the flow loss on generation slots, sampling through the shared loop with
the semantic decoder's cache, in-context editing, and the tiny system end to end
(`python -m unimm_jax.main --config=configs/ming_univision.py:tiny`)."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import (FAST_COMPILE, assert_exact_losses_match, assert_resumes_bit_identically,
                      read_metrics, run_main)
from unimm_jax import config_defaults
from unimm_jax.data import scenes
from unimm_jax.inference import mllm_inference
from unimm_jax.models import flow_head
from unimm_jax.train import trainer
from unimm_jax.train.tasks.mllm import shifted_targets

TINY = "configs/ming_univision.py:tiny"
NO_GENERATION = ("--config.eval.num_answers=0", "--config.eval.num_generations=0",
                 "--config.eval.num_edits=0")


@pytest.fixture(scope="module")
def tiny_setup():
  config = config_defaults.load_config(TINY)
  config.generation.image_scale = 1.0  # the (1, 1) test below
  setup = trainer.Setup(config)
  state = setup.init_state(FAST_COMPILE)
  batch = next(setup.task.train_iterator(0))
  batch = {k: v for k, v in batch.items() if k != "skipped"}
  frozen = jax.device_get(setup.task.load_frozen())
  return setup, state, batch, frozen


def _live_head(params: dict) -> dict:
  """`params` with the flow head's zero-initialised layers made nonzero, so its velocity
  depends on the condition (at init it is 0 everywhere)."""
  leaves, tree = jax.tree.flatten(params["flow_head"])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [a + 0.2 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  return {**params, "flow_head": jax.tree.unflatten(tree, leaves)}


def test_flow_loss_is_the_heads_loss_on_the_generation_slots(tiny_setup):
  """`flow` = the head's velocity loss on the latents of the generation slots, each
  conditioned on the hidden state one position earlier; the task trains it."""
  setup, state, batch, frozen = tiny_setup
  system, params = setup.task.system, state.params
  embedded = system.embed(params, frozen, batch, train=False, rng=None)
  hidden = np.asarray(system.llm.apply(
      {"params": params["llm"]}, inputs_embeds=embedded.embeds, positions=batch["positions"],
      segment_ids=batch["segment_ids"], method=system.llm.hidden_states))
  rng = jax.random.key(3)
  got = system.generation_losses(params, hidden, batch, embedded, rng, train=True)["flow"]
  predicts = ((np.asarray(shifted_targets(jnp.asarray(batch["discrete_index"]))) >= 0)
              & (batch["loss_mask"] > 0))
  assert predicts.sum() > 0  # the batch has generation targets
  latents = np.asarray(system.image_latents(frozen, batch["images"]))
  flat = latents.reshape(latents.shape[0], -1, latents.shape[-1])
  most = batch["images"].shape[1] * system.image_slots.codes_per_image
  x = np.zeros((len(flat), most, flat.shape[-1]), np.float32)
  h = np.zeros((len(flat), most, hidden.shape[-1]), np.float32)
  w = np.zeros((len(flat), most), np.float32)
  for b in range(len(flat)):  # the predicting positions first, in order; the rest weight 0
    idx = np.nonzero(predicts[b])[0]
    x[b, :len(idx)] = flat[b, batch["discrete_index"][b, idx + 1]]
    h[b, :len(idx)], w[b, :len(idx)] = hidden[b, idx], 1.0
  want = system.head.apply({"params": params["flow_head"]}, x, h, w,
                           method=flow_head.FlowHead.loss, rngs={"noise": rng})
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  terms, _ = setup.task._terms(params, frozen, batch, rng, train=True)  # pylint: disable=protected-access
  assert np.isfinite(float(terms["flow"])) and np.isfinite(float(terms["ce"]))


def test_cfg_scales_one_equal_the_conditional_stream(tiny_setup):
  """Image steps at text and image scale 1 with two or three streams give what the
  conditional stream gives alone: latent, next LLM input and the semantic cache."""
  setup, state, _, frozen = tiny_setup
  system, params = setup.task.system, _live_head(state.params)
  width = system.llm.config.hidden_size
  rng = np.random.default_rng(0)
  streams = [rng.standard_normal((2, width)).astype(np.float32) for _ in range(3)]
  outs = []
  for k in (1, 2, 3):
    step_fn, state0, n = system.image_step(params, frozen, cfg_scale=1.0, temperature=1.0,
                                           top_k=None, top_p=None, batch_size=2)
    outs.append(jax.jit(step_fn)(streams[:k], state0, jax.random.key(0), jnp.int32(0)))
  for other in outs[1:]:
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(outs[0])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert n == system.image_slots.codes_per_image
  step_fn, state0, _ = system.image_step(params, frozen, cfg_scale=3.0, temperature=1.0,
                                         top_k=None, top_p=None, batch_size=2)
  guided = jax.jit(step_fn)(streams[:2], state0, jax.random.key(0), jnp.int32(0))
  assert not np.allclose(np.asarray(guided[2][0]), np.asarray(outs[0][2][0]))


def test_each_step_feeds_the_projected_semantic_feature_of_its_latent(tiny_setup):
  """Step by step, the next LLM input is projector(the semantic decoder's feature of the
  latents so far, as one causal pass computes it), and the state keeps the latents."""
  setup, state, _, frozen = tiny_setup
  system, params = setup.task.system, state.params
  width = system.llm.config.hidden_size
  step_fn, carry, _ = system.image_step(params, frozen, cfg_scale=1.0, temperature=1.0,
                                        top_k=None, top_p=None, batch_size=2)
  step_fn = jax.jit(step_fn)
  fed = []
  for step in range(3):
    hidden = [np.random.default_rng(step).standard_normal((2, width)).astype(np.float32)]
    _, next_input, carry, done = step_fn(hidden, carry, jax.random.key(step), jnp.int32(step))
    fed.append(next_input)
    assert not np.asarray(done).any()
  latents = np.asarray(system.generated_latents(carry))[:, :3]
  want = system.image_inputs(params, frozen, latents[:, None])
  np.testing.assert_allclose(np.stack(fed, 1), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_edit_keeps_images_in_context_as_latents(tiny_setup, monkeypatch):
  """Two rounds: the pixel encoder runs once (round 1's input); round 2's prompt reads the
  images as latents (no pixels in any batch), and changing round 1's latents changes round
  2's image."""
  setup, state, _, frozen = tiny_setup
  system, task = setup.task.system, setup.task
  runner = mllm_inference.MLLMRunner(system, task.tokenizer)
  encodes, pixel_batches = [], []
  original_encode, original_embed = runner._image_latents, system.embed  # pylint: disable=protected-access
  monkeypatch.setattr(runner, "_image_latents", lambda *a: encodes.append(1) or
                      original_encode(*a))
  monkeypatch.setattr(system, "embed", lambda params, frozen, batch, **kw: (
      pixel_batches.append("images" in batch) or original_embed(params, frozen, batch, **kw)))
  size = system.image_slots.image_size
  image = scenes.render(scenes.sample_scene(scenes.scene_seed("eval", 0)), size) / 127.5 - 1.0
  instructions = ["Make the circle blue.", "Move the square to the left."]
  params = _live_head(state.params)
  images, latents = runner.edit(params, frozen, image[None], [instructions], cfg_scale=2.0)
  assert images.shape == (1, 2, size, size, 3) and latents.shape[:2] == (1, 3)
  assert len(encodes) == 1 and pixel_batches and not any(pixel_batches)
  again, _ = runner.edit_round(params, frozen, latents[:, :2], [instructions], cfg_scale=2.0)
  np.testing.assert_allclose(again, images[:, 1], atol=1e-5)
  changed = latents[:, :2].copy()
  changed[:, 1] += 1.0
  other, _ = runner.edit_round(params, frozen, changed, [instructions], cfg_scale=2.0)
  assert np.abs(other - images[:, 1]).max() > 1e-3


def test_stages_train_what_the_paper_says():
  config = config_defaults.load_config(TINY + ",pretrain_stage1")
  setup = trainer.Setup(config)
  state = setup.abstract_state
  assert sorted(state.params) == ["flow_head", "llm", "projector"]
  frozen, _ = setup.task.optimizer.frozen((state.params, None))
  flat = flax.traverse_util.flatten_dict(frozen, sep="/")
  assert sorted({p.split("/")[0] for p, f in flat.items() if not f}) == ["flow_head",
                                                                          "projector"]
  weights = {s: config_defaults.load_config(f"{TINY},{s}").data for s in
             ("pretrain_stage1", "pretrain_stage2", "sft_stage1", "sft_stage2")}
  assert (weights["pretrain_stage1"].understanding_weight,
          weights["pretrain_stage1"].generation_weight) == (0.3, 0.7)
  assert weights["sft_stage2"].editing_weight == 0.55
  for stage in ("pretrain_stage2", "sft_stage1", "sft_stage2"):
    trainer.Setup(config_defaults.load_config(f"{TINY},{stage}"))


# ---- end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ming_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ming_univision_run")
  return workdir, run_main(workdir, config=TINY)


@pytest.mark.e2e
def test_run_logs_the_flow_loss_evaluates_and_checkpoints(ming_run):
  workdir, proc = ming_run
  metrics = read_metrics(workdir)
  for key in ("loss", "loss/ce", "loss/flow", "eval/loss", "eval/flow",
              "eval/accuracy/all", "eval/generation_check", "eval/edit_check",
              "eval/edit_check/round_1"):
    assert key in metrics[4], key
  assert "step_0000004.png" in os.listdir(os.path.join(workdir, "edits"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert "held-out answer accuracy / generation check at step 4" in proc.stdout


@pytest.mark.e2e
def test_eight_devices_match_one(ming_run, tmp_path):
  workdir, _ = ming_run
  run_main(tmp_path, "--config.mesh.data=4", "--config.mesh.fsdp=2", *NO_GENERATION,
           config=TINY, devices=8)
  assert_exact_losses_match(read_metrics(tmp_path), read_metrics(workdir))


@pytest.mark.e2e
def test_resume_is_bit_identical(ming_run, tmp_path):
  assert_resumes_bit_identically(ming_run[0], tmp_path, *NO_GENERATION, config=TINY)


@pytest.mark.e2e
def test_chat_generate_and_edit_modes(ming_run, tmp_path):
  """chat prints one (untrained: possibly empty) answer line; generate writes two 32 px
  PNGs with guidance; edit writes the input and one image per round."""
  workdir = ming_run[0]
  size = config_defaults.load_config(TINY).vq.image_size
  scene = scenes.render(scenes.sample_scene(scenes.scene_seed("eval", 1)), size)
  Image.fromarray(scene).save(tmp_path / "scene.png")
  chat = run_main(workdir, f"--image={tmp_path / 'scene.png'}",
                  "--prompt=How many objects are there?", config=None, mode="chat")
  assert chat.stdout.count("\n") == 1
  run_main(workdir, "--prompt=Draw a red circle on the left.", f"--output={tmp_path / 'gen'}",
           "--num_images=2", "--cfg_scale=2", config=None, mode="generate")
  assert sorted(os.listdir(tmp_path / "gen")) == ["image_000.png", "image_001.png"]
  assert np.asarray(Image.open(tmp_path / "gen" / "image_000.png")).shape == (size, size, 3)
  proc = run_main(workdir, f"--image={tmp_path / 'scene.png'}",
                  "--prompt=Make the circle blue.", "--prompt=Remove the square.",
                  f"--output={tmp_path / 'edits'}", config=None, mode="edit")
  assert "wrote 2 edited rounds" in proc.stdout
  assert sorted(os.listdir(tmp_path / "edits")) == ["round_0.png", "round_1.png",
                                                    "round_2.png"]
