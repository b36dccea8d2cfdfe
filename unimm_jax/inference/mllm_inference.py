"""Answers and images from a unified system, through the one KV-cached generation loop.

  runner = MLLMRunner(system, tokenizer, max_answer_tokens=32)
  answers = runner.answer(params, frozen, records)            # list[str], greedy
  images = runner.generate(params, frozen, prompts, cfg_scale=3.0, temperature=1.0,
                           top_k=None, top_p=None, seed=0)    # (n, H, W, 3) in [-1, 1]

`records` are conversation records (`unimm_jax.data.mllm_sequence`): a user turn with an
image and a question; the prompt ends after the assistant's prefix. Image prompts end with
[BOI]; with a CFG scale other than 1 an unconditional stream that holds only [BOI] runs
beside it with its own cache (SPECS 3). Both are batched (left-padded) and run on whatever
devices hold `params` and the batch (a mesh: place them with a `MeshContext`).
"""
import functools
from typing import Sequence

import jax
import numpy as np

from unimm_jax.data import mllm_sequence
from unimm_jax.inference import generation_loop


class MLLMRunner:
  """Jitted answer and image generation for one system (see the module docstring)."""

  def __init__(self, system, tokenizer, *, max_answer_tokens: int = 32,
               place=lambda batch: batch, batch_multiple: int = 1,
               chat_template: str = 'plain'):
    self.system, self.tokenizer = system, tokenizer
    self.chat_template = chat_template  # mllm_sequence's turn template
    self.max_answer_tokens = max_answer_tokens
    self.place = place  # host batch -> device batch (e.g. MeshContext.place_batch)
    self.batch_multiple = batch_multiple  # e.g. a mesh's batch shards

  def _padded(self, items: list) -> list:
    """`items` repeated at the end up to a multiple of batch_multiple (callers keep the
    first len(items) results), so any number of prompts splits over the mesh."""
    missing = -len(items) % self.batch_multiple
    return list(items) + [items[-1]] * missing

  def _collate(self, sequences) -> dict:
    batch = mllm_sequence.collate_prompts(self._padded(sequences), images_per_row=1)
    return self.place(batch)

  @classmethod
  def on_mesh(cls, system, tokenizer, context, **kwargs) -> 'MLLMRunner':
    """A runner whose batches are split over `context`'s mesh (a MeshContext)."""
    return cls(system, tokenizer, place=lambda b: context.place_batch(b, host_local=False),
               batch_multiple=context.batch_shards, **kwargs)

  @functools.partial(jax.jit, static_argnums=(0,))
  def _answer(self, params, frozen, batch) -> jax.Array:
    embedded = self.system.embed(params, frozen, batch, train=False, rng=None)
    step_fn, state = self.system.answer_step(params)
    outputs, _ = generation_loop.run(
        self.system.llm, params['llm'], [(embedded.embeds, batch['attention_mask'])], step_fn,
        state, jax.random.key(0), max_new=self.max_answer_tokens, pad_id=self.system.ids.pad)
    return outputs

  def answer(self, params, frozen, records: Sequence[dict]) -> list[str]:
    """Greedy answers (text up to the end-of-turn id) to the user turns of `records`."""
    sequences = [mllm_sequence.encode_conversation(r, self.tokenizer, self.system.ids,
                                                   self.system.image_slots,
                                                   generation_prompt='answer',
                                                   template=self.chat_template)
                 for r in records]
    outputs = np.asarray(jax.device_get(self._answer(params, frozen, self._collate(sequences))))
    answers = []
    for row in outputs[:len(sequences)]:
      ids = row.tolist()
      ids = ids[:ids.index(self.system.ids.eos)] if self.system.ids.eos in ids else ids
      answers.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers

  @functools.partial(jax.jit, static_argnums=(0,), static_argnames=('cfg_scale', 'temperature',
                                                                     'top_k', 'top_p'))
  def _generate(self, params, frozen, batch, uncond, rng, *, cfg_scale: float,
                temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    streams = [(self.system.embed(params, frozen, batch, train=False, rng=None).embeds,
                batch['attention_mask'])]
    if uncond is not None:
      streams.append((self.system.embed(params, frozen, uncond, train=False, rng=None).embeds,
                      uncond['attention_mask']))
    step_fn, state, n = self.system.image_step(
        params, frozen, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
        batch_size=batch['tokens'].shape[0])
    outputs, state = generation_loop.run(self.system.llm, params['llm'], streams, step_fn,
                                         state, rng, max_new=n, pad_id=self.system.ids.pad)
    return self.system.render(params, frozen, outputs, state)

  def generate(self, params, frozen, prompts: Sequence[str], *, cfg_scale: float = 1.0,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               seed: int = 0) -> np.ndarray:
    """Images (n, H, W, 3) in [-1, 1] for text prompts, sampled with `seed`."""
    records = [{'kind': 'generation', 'meta': {},
                'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': p}]}]}
               for p in prompts]
    sequences = [mllm_sequence.encode_conversation(r, self.tokenizer, self.system.ids,
                                                   self.system.image_slots,
                                                   generation_prompt='image',
                                                   template=self.chat_template)
                 for r in records]
    uncond = None
    if cfg_scale != 1.0:
      blank = mllm_sequence.unconditional_image_prompt(self.system.ids, self.system.image_slots)
      uncond = self._collate([blank] * len(prompts))
    images = self._generate(params, frozen, self._collate(sequences), uncond,
                            jax.random.key(seed), cfg_scale=float(cfg_scale),
                            temperature=float(temperature), top_k=top_k,
                            top_p=None if top_p is None else float(top_p))
    return np.asarray(jax.device_get(images))[:len(prompts)]
