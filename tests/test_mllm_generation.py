"""The one KV-cached generation loop with a unified system's steps, against a reference that
recomputes the whole sequence without a cache at every step (configs/unitoken.py:tiny)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import config_defaults
from unimm_jax.inference import generation_loop
from unimm_jax.inference import sampling
from unimm_jax.systems import unified_systems


@pytest.fixture(scope="module")
def system_and_params():
  config = config_defaults.load_config("configs/unitoken.py:tiny")
  system = unified_systems.build(config)
  params = flax.linen.unbox(jax.jit(system.init_params)(jax.random.key(1)))
  # A random LLM is near uniform; sharpen its head so greedy choices are well separated.
  params["llm"]["lm_head"] = params["llm"]["lm_head"] * 30.0
  return system, params


def _left_padded(rows, pad, width=None):
  width = width or max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, True
  return jnp.asarray(ids), jnp.asarray(mask)


def _reference(system, params, streams, choose, n):
  """Tokens from full recomputation without a cache: each step runs the whole (left-padded
  to a fixed width, so one compilation) sequence of every stream; choose(hiddens, step)."""

  @jax.jit
  def last_hidden(ids, mask):
    embeds = system.llm.apply({"params": params["llm"]}, ids, method=system.llm.embed)
    hidden = system.llm.apply({"params": params["llm"]}, inputs_embeds=embeds,
                              attention_mask=mask, method=system.llm.hidden_states)
    return hidden[:, -1]

  rows = [[list(np.asarray(i)[b][np.asarray(m)[b]]) for b in range(len(i))] for i, m in streams]
  width = max(len(r) for stream in rows for r in stream) + n
  out = []
  for step in range(n):
    hiddens = [last_hidden(*_left_padded(stream, system.ids.pad, width)) for stream in rows]
    token = np.asarray(choose(hiddens, step))
    out.append(token)
    rows = [[r + [int(t)] for r, t in zip(stream, token)] for stream in rows]
  return np.stack(out, 1)


def _run(system, params, streams, step_fn, n):
  embedded = [(generation_loop.embed_ids(system.llm, params["llm"], ids), mask)
              for ids, mask in streams]
  outputs, _ = generation_loop.run(system.llm, params["llm"], embedded, step_fn, (),
                                   jax.random.key(0), max_new=n, pad_id=system.ids.pad)
  return np.asarray(outputs)


def test_greedy_answers_match_full_recomputation(system_and_params):
  system, params = system_and_params
  ids = system.ids
  prompts = _left_padded([[ids.bos, 7, 8, 9, 10], [ids.bos, 11, 12]], ids.pad)
  step_fn, _ = system.answer_step(params)
  n = 6
  got = _run(system, params, [prompts], step_fn, n)
  allowed = system._text_mask()

  def choose(hiddens, step):
    del step
    logits = np.asarray(generation_loop.logits(system.llm, params["llm"], hiddens[0]))
    return np.argmax(np.where(allowed, logits, -np.inf), -1)

  want = _reference(system, params, [prompts], choose, n)
  # After a row's end-of-turn the loop writes pad; compare up to and including it.
  for g, w in zip(got, want):
    stop = list(w).index(ids.eos) + 1 if ids.eos in w else n
    np.testing.assert_array_equal(g[:stop], w[:stop])
  assert not np.isin(got, np.arange(ids.image_offset, ids.image_offset + ids.num_image_codes)).any()


def test_cfg_image_generation_matches_full_recomputation_and_grammar(system_and_params):
  """Greedy (temperature 0) CFG: the unconditional stream holds only [BOI] (own cache)."""
  system, params = system_and_params
  ids, slots = system.ids, system.image_slots
  cond = _left_padded([[ids.bos, 7, 8, 9, ids.boi], [ids.bos, 10, ids.boi]], ids.pad)
  uncond = _left_padded([[ids.boi], [ids.boi]], ids.pad)
  scale = 3.0
  step_fn, _, n = system.image_step(params, None, cfg_scale=scale, temperature=0.0, top_k=None,
                                    top_p=None, batch_size=2)
  got = _run(system, params, [cond, uncond], step_fn, n)
  grammar = system._grammar()

  def choose(hiddens, step):
    logits = [np.asarray(generation_loop.logits(system.llm, params["llm"], h)) for h in hiddens]
    mixed = np.asarray(sampling.cfg_combine(logits[0], logits[1], scale))
    return np.argmax(np.where(grammar[step], mixed, -np.inf), -1)

  want = _reference(system, params, [cond, uncond], choose, n)
  np.testing.assert_array_equal(got, want)
  side, units = slots.discrete_side, slots.image_size // slots.size_unit
  assert n == 2 + side * (side + 1) + 1
  for row in got:
    assert row[0] == row[1] == ids.size_base + units and row[-1] == ids.eoi
    body = row[2:-1].reshape(side, side + 1)
    assert (body[:, -1] == ids.eor).all()
    assert ((body[:, :-1] >= ids.image_offset)
            & (body[:, :-1] < ids.image_offset + ids.num_image_codes)).all()
  # Guidance changes the choice somewhere (otherwise the uncond stream would be unused).
  plain_fn, _, _ = system.image_step(params, None, cfg_scale=1.0, temperature=0.0, top_k=None,
                                     top_p=None, batch_size=2)
  assert (_run(system, params, [cond], plain_fn, n) != got).any()


def test_render_decodes_the_code_rows(system_and_params):
  system, params = system_and_params
  ids, slots = system.ids, system.image_slots
  side = slots.discrete_side
  rng = np.random.default_rng(0)
  codes = rng.integers(0, ids.num_image_codes, (2, side, side))
  rows = np.concatenate([codes + ids.image_offset, np.full((2, side, 1), ids.eor)], 2)
  units = ids.size_base + slots.image_size // slots.size_unit
  outputs = np.concatenate([np.full((2, 2), units), rows.reshape(2, -1),
                            np.full((2, 1), ids.eoi)], 1)
  frozen = system.load_frozen()
  got = jax.jit(system.render)(params, frozen, jnp.asarray(outputs), ())
  want = jax.jit(lambda f, c: system.vq.apply({"params": f["vq"]}, c, method="decode_codes"))(
      frozen, jnp.asarray(codes))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert got.shape == (2, slots.image_size, slots.image_size, 3)
