"""BitDance's unified MLLM on UniWeTok's bits: the 'blocks' image layout, the block-causal
mask against the authors' rule, a cached P-token generation step equal to the full pass,
the diffusion loss on the right targets, in-context editing, the fine-tune variants, and the
tiny system end to end (`python -m unimm_jax.main --config=configs/bitdance_mllm.py:tiny`)."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (FAST_COMPILE, assert_exact_losses_match, assert_resumes_bit_identically,
                      read_metrics, run_main)
from unimm_jax import config_defaults
from unimm_jax.data import mllm_sequence, scenes
from unimm_jax.inference import generation_loop, mllm_inference
from unimm_jax.models import bit_diffusion
from unimm_jax.nn import masks
from unimm_jax.train import trainer

TINY = "configs/bitdance_mllm.py:tiny"
NO_GENERATION = ("--config.eval.num_answers=0", "--config.eval.num_generations=0",
                 "--config.eval.num_edits=0")


@pytest.fixture(scope="module")
def tiny_setup():
  setup = trainer.Setup(config_defaults.load_config(TINY))
  state = setup.init_state(FAST_COMPILE)
  batch = next(setup.task.train_iterator(0))
  batch = {k: v for k, v in batch.items() if k != "skipped"}
  frozen = jax.device_get(setup.task.load_frozen())
  return setup, state, batch, frozen


def _live_head(params: dict) -> dict:
  """`params` with the head's zero-initialised layers made nonzero, so its estimate depends
  on the condition."""
  leaves, tree = jax.tree.flatten(params["head"])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [a + 0.2 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  return {**params, "head": jax.tree.unflatten(tree, leaves)}


def _edit_record(size: int) -> dict:
  image = scenes.render(scenes.sample_scene(scenes.scene_seed("eval", 0)), size)
  return {"kind": "editing", "meta": {}, "messages": [
      {"role": "user", "content": [{"type": "image", "image": image},
                                   {"type": "text", "text": "Make the circle blue."}]},
      {"role": "assistant", "content": [{"type": "image", "image": image}]}]}


def test_blocks_layout_reads_and_writes_images_as_their_code_does(tiny_setup):
  """A read image is [BOI] [res] [res] {n slots} [EOI]; a written one puts the P - 1 queries
  before its slots; only [BOI], the written slots and [EOI] are targets; an image prompt
  ends with the opening, queries included."""
  setup = tiny_setup[0]
  system, tokenizer = setup.task.system, setup.task.tokenizer
  ids, slots = system.ids, system.image_slots
  n, p = slots.codes_per_image, system.parallel
  size = ids.size_base + slots.discrete_side
  queries = list(range(ids.query_base, ids.query_base + p - 1))
  seq = mllm_sequence.encode_conversation(_edit_record(slots.image_size), tokenizer, ids, slots)
  tokens, supervised = seq.tokens.tolist(), seq.supervised
  read = tokens.index(ids.boi)
  assert tokens[read:read + 3] == [ids.boi, size, size]
  assert (seq.continuous_slot[read + 3:read + 3 + n] == np.arange(n)).all()
  assert tokens[read + 3 + n] == ids.eoi and not supervised[read:read + 4 + n].any()
  write = tokens.index(ids.boi, read + 1)
  assert tokens[write:write + 3 + p - 1] == [ids.boi, size, size] + queries
  first = write + 2 + p
  assert (seq.discrete_slot[first:first + n] == n + np.arange(n)).all()
  assert tokens[first + n] == ids.eoi
  assert supervised[write] and not supervised[write + 1:first].any()
  assert supervised[first:first + n + 1].all()
  prompt = mllm_sequence.encode_conversation(_edit_record(slots.image_size), tokenizer, ids,
                                             slots, generation_prompt="image")
  assert prompt.tokens[-(2 + p):].tolist() == [ids.boi, size, size] + queries
  assert system.tokenizer_image_size() == 16 and slots.discrete_side == 4


def _their_mask(tokens: np.ndarray, boi: list[int], p: int) -> np.ndarray:
  """The authors' create_sparse_mask for one row: causal, or both tokens in the same written
  image span at local index >= 2 (from its [BOI]) and in the same block of P."""
  length = len(tokens)
  local = np.full(length, -1)
  span = np.full(length, -1)
  for k, start in enumerate(boi):
    end = start + 1 + list(tokens[start + 1:]).index(tokens[start] + 1)  # its [EOI]
    local[start:end + 1] = np.arange(end + 1 - start)
    span[start:end + 1] = k
  q, key = np.arange(length)[:, None], np.arange(length)[None]
  block = lambda i: (local[i] - 2) // p
  same = ((span[q] == span[key]) & (span[q] >= 0) & (local[q] >= 2) & (local[key] >= 2)
          & (block(q) == block(key)))
  return (q >= key) | same


def test_mask_is_the_authors_block_causal_rule(tiny_setup):
  """system.attention gives exactly their create_sparse_mask (parallel_causal_num = 2, blocks
  of P) on a written image; a read image stays causal."""
  setup = tiny_setup[0]
  system, tokenizer = setup.task.system, setup.task.tokenizer
  seq = mllm_sequence.encode_conversation(_edit_record(system.image_slots.image_size),
                                          tokenizer, system.ids, system.image_slots)
  batch = mllm_sequence.collate_prompts([seq], images_per_row=2)
  spec = system.attention(batch)
  got = np.asarray(masks.dense_mask(spec.order, spec.order))[0, 0]
  boi = np.flatnonzero(seq.tokens == system.ids.boi)
  assert system.ids.eoi == system.ids.boi + 1  # _their_mask finds the span's end so
  want = _their_mask(seq.tokens, [int(boi[1])], system.parallel)  # the written image only
  np.testing.assert_array_equal(got, want)
  assert (got != np.tril(np.ones_like(got))).sum() > 0  # some block is bidirectional


def test_cached_block_steps_equal_one_full_pass(tiny_setup):
  """generation_loop.run with block P (prefill of the prompt, then P embeddings per step)
  gives the hidden states one forward pass gives for the whole sequence under the system's
  mask: the P states that condition each block."""
  setup, state, _, _ = tiny_setup
  system, params = setup.task.system, state.params
  p, n = system.parallel, system.image_slots.codes_per_image
  prompt = mllm_sequence.encode_conversation(
      {"kind": "generation", "meta": {}, "messages": [
          {"role": "user", "content": [{"type": "text", "text": "a red circle"}]}]},
      setup.task.tokenizer, system.ids, system.image_slots, generation_prompt="image")
  batch = mllm_sequence.collate_prompts([prompt], images_per_row=1)
  embeds = generation_loop.embed_ids(system.llm, params["llm"], jnp.asarray(batch["tokens"]))
  fed = jax.random.normal(jax.random.key(1), (1, n, embeds.shape[-1]))

  def recording_step(hidden, state, rng, step):
    """Keeps the P hidden states of each step; feeds the next P rows of `fed`."""
    del rng
    state = jax.lax.dynamic_update_slice_in_dim(state, hidden[0], step * p, axis=1)
    nxt = jax.lax.dynamic_slice_in_dim(fed, step * p, p, axis=1)
    return jnp.zeros((1,), jnp.int32), nxt, state, jnp.zeros((1,), bool)

  _, states = jax.jit(lambda: generation_loop.run(
      system.llm, params["llm"], [(embeds, jnp.asarray(batch["attention_mask"]))],
      recording_step, jnp.zeros((1, n, embeds.shape[-1])), jax.random.key(0), max_new=n // p,
      block=p, prompt_masks=[system.attention(batch)]))()
  full = {"tokens": np.concatenate([batch["tokens"], np.full((1, n), system.ids.pad)], 1),
          "discrete_index": np.concatenate([batch["discrete_index"],
                                            np.arange(n, dtype=np.int32)[None]], 1)}
  hidden = system.llm.apply({"params": params["llm"]},
                            inputs_embeds=jnp.concatenate([embeds, fed], axis=1),
                            mask=system.attention(full), method=system.llm.hidden_states)
  start = len(prompt) - p  # [res_w] and the queries condition the first block
  np.testing.assert_allclose(np.asarray(states), np.asarray(hidden[:, start:start + n]),
                             rtol=1e-4, atol=1e-4)


def test_bitdiff_loss_reads_the_block_p_positions_ahead(tiny_setup):
  """'bitdiff' = the head's v-loss on each written block, its targets the bits of the slots
  P positions after the conditioning hidden states (+ the targets' position embeddings)."""
  setup, state, batch, frozen = tiny_setup
  system, params = setup.task.system, _live_head(state.params)
  p = system.parallel
  embedded = system.embed(params, frozen, batch, train=False, rng=None)
  hidden = np.asarray(system.llm.apply(
      {"params": params["llm"]}, inputs_embeds=embedded.embeds, positions=batch["positions"],
      segment_ids=batch["segment_ids"], mask=system.attention(batch),
      method=system.llm.hidden_states))
  rng = jax.random.key(3)
  got = system.generation_losses(params, hidden, batch, embedded, rng, train=True)["bitdiff"]
  latents = np.asarray(system.image_latents(frozen, batch["images"]))
  flat = latents.reshape(latents.shape[0], -1, latents.shape[-1])
  n = system.image_slots.codes_per_image
  index, supervised = batch["discrete_index"], np.zeros_like(batch["loss_mask"])
  supervised[:, 1:] = batch["loss_mask"][:, :-1]  # token t is a target
  most = batch["images"].shape[1] * n
  x = np.zeros((len(flat), most, flat.shape[-1]), np.float32)
  c = np.zeros((len(flat), most, hidden.shape[-1]), np.float32)
  w = np.zeros((len(flat), most), np.float32)
  positions = np.asarray(system.positions)
  for b in range(len(flat)):
    targets = np.nonzero((index[b] >= 0) & (supervised[b] > 0))[0]
    x[b, :len(targets)] = flat[b, index[b, targets]]
    c[b, :len(targets)] = hidden[b, targets - p] + positions[index[b, targets] % n]
    w[b, :len(targets)] = 1.0
  assert w.sum() > 0 and w.sum() % p == 0  # the batch writes whole images
  denoise = lambda z, t, cond: system.head.apply({"params": params["head"]}, z, t, cond)
  blocks = lambda a: a.reshape((-1, p) + a.shape[2:])
  want, _ = bit_diffusion.denoising_loss(denoise, blocks(x), blocks(c), rng, t_mean=-0.8,
                                         t_std=0.8, t_per_row=True,
                                         row_weights=blocks(w)[:, 0])
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_edit_keeps_images_in_context_as_bits(tiny_setup):
  """Two rounds of editing read every image as bits; the round-2 image depends on round 1's
  bits, and reruns of a round from the same context repeat it."""
  setup, state, _, frozen = tiny_setup
  system = setup.task.system
  runner = mllm_inference.MLLMRunner(system, setup.task.tokenizer)
  size = system.image_slots.image_size
  image = scenes.render(scenes.sample_scene(scenes.scene_seed("eval", 0)), size) / 127.5 - 1.0
  instructions = ["Make the circle blue.", "Move the square to the left."]
  params = _live_head(state.params)
  images, bits = runner.edit(params, frozen, image[None], [instructions], cfg_scale=2.0)
  assert images.shape == (1, 2, size, size, 3) and bits.shape[:2] == (1, 3)
  assert set(np.unique(bits)) == {-1.0, 1.0}
  again, _ = runner.edit_round(params, frozen, bits[:, :2], [instructions], cfg_scale=2.0)
  np.testing.assert_allclose(again, images[:, 1], atol=1e-5)
  changed = bits[:, :2].copy()
  changed[:, 1] *= -1.0
  other, _ = runner.edit_round(params, frozen, changed, [instructions], cfg_scale=2.0)
  assert np.abs(other - images[:, 1]).max() > 1e-3


def test_finetune_variants():
  """Gen, Edit and Chat are mixtures; Chat freezes the head (nothing trains it)."""
  for name, weights in (("gen", (0.0, 1.0, 0.0)), ("edit", (0.0, 0.0, 1.0)),
                        ("chat", (1.0, 0.0, 0.0))):
    data = config_defaults.load_config(f"{TINY},{name}").data
    assert (data.understanding_weight, data.generation_weight, data.editing_weight) == weights
  setup = trainer.Setup(config_defaults.load_config(f"{TINY},chat"))
  frozen, _ = setup.task.optimizer.frozen((setup.abstract_state.params, None))
  flat = flax.traverse_util.flatten_dict(frozen, sep="/")
  assert {p.split("/")[0] for p, f in flat.items() if f} == {"head"}
  paper = config_defaults.load_config("configs/bitdance_mllm.py:paper")
  assert (paper.loss.ce, paper.optim.eps, paper.system.parallel) == (0.01, 1e-15, 16)


def test_a_fresh_run_starts_from_the_authors_mllm_state_dict(tmp_path):
  """config.system.weights_path: the LLM (their llm_model.*), the head and the connector of
  a fresh run are the file's tensors (their fixture head and connector, a random Qwen3)."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  from test_bitdance_mllm_weights import STATE_DICTS, _qwen3_tensors  # pylint: disable=import-outside-toplevel
  config = config_defaults.load_config(TINY)
  config.model.update(dict(hidden_size=64, intermediate_size=64, num_heads=4, num_kv_heads=2,
                           head_dim=16))
  config.head.update(dict(width=128, depth=2, adaln_blocks=1, head_dim=128))
  llm, _ = _qwen3_tensors(np.random.default_rng(1), vocab=config.model.vocab_size, d=64,
                          inter=64, layers=2, heads=4, kv_heads=2, k=16)
  whole = {**load_file(STATE_DICTS["a"]), **{"llm_model." + k: v for k, v in llm.items()}}
  path = str(tmp_path / "mllm.safetensors")
  save_file(whole, path)
  config.system.weights_path = path
  setup = trainer.Setup(config)
  params = setup.start_from_weights(setup.init_state(FAST_COMPILE)).params
  np.testing.assert_array_equal(np.asarray(params["llm"]["embed_tokens"]["embedding"]),
                                llm["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(params["connector"]["fc1"]["kernel"]),
                                whole["embed_vision_mlp.fc1.weight"].T)
  np.testing.assert_array_equal(np.asarray(params["head"]["final_linear"]["kernel"]),
                                whole["vision_diffusion_head.net.final_layer.linear.weight"].T)
  config.head.width = 256  # a head that their tensors do not fit: named
  with pytest.raises(ValueError, match="vision_diffusion_head"):
    trainer.Setup(config).task.initial_weights()


# ---- end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bitdance_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bitdance_mllm_run")
  return workdir, run_main(workdir, config=TINY)


@pytest.mark.e2e
def test_run_logs_the_diffusion_loss_evaluates_and_checkpoints(bitdance_run):
  workdir, proc = bitdance_run
  metrics = read_metrics(workdir)
  for key in ("loss", "loss/ce", "loss/bitdiff", "eval/loss", "eval/bitdiff",
              "eval/accuracy/all", "eval/generation_check", "eval/edit_check"):
    assert key in metrics[4], key
  assert "step_0000004.png" in os.listdir(os.path.join(workdir, "edits"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert "held-out answer accuracy / generation check at step 4" in proc.stdout


@pytest.mark.e2e
def test_eight_devices_match_one(bitdance_run, tmp_path):
  workdir, _ = bitdance_run
  run_main(tmp_path, "--config.mesh.data=4", "--config.mesh.fsdp=2", *NO_GENERATION,
           config=TINY, devices=8)
  assert_exact_losses_match(read_metrics(tmp_path), read_metrics(workdir))


@pytest.mark.e2e
def test_resume_is_bit_identical(bitdance_run, tmp_path):
  assert_resumes_bit_identically(bitdance_run[0], tmp_path, *NO_GENERATION, config=TINY)
