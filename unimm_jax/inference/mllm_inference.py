"""Answers and images from a unified system, through the one KV-cached generation loop.

  runner = MLLMRunner(system, tokenizer, max_answer_tokens=32)
  answers = runner.answer(params, frozen, records)            # list[str], greedy
  images = runner.generate(params, frozen, prompts, cfg_scale=3.0, temperature=1.0,
                           top_k=None, top_p=None, seed=0)    # (n, H, W, 3) in [-1, 1]

  rounds, latents = runner.edit(params, frozen, images, [['Make the circle blue.', ...], ...],
                                cfg_scale=3.0, temperature=1.0, seed=0)
                                # (b, k, H, W, 3): one image per row and round

`records` are conversation records (`unimm_jax.data.mllm_sequence`): a user turn with an
image and a question; the prompt ends after the assistant's prefix. Image prompts end with
[BOI]; with a CFG scale other than 1 an unconditional stream that holds only [BOI] runs
beside it with its own cache (SPECS 3). Both are batched (left-padded) and run on whatever
devices hold `params` and the batch (a mesh: place them with a `MeshContext`).

Editing (a system with `edits_in_context`): round r's prompt is the whole conversation so
far (the user's image and first instruction, each generated image as an assistant turn, the
next instructions) ending with [BOI]; every image enters as its latents (the user's image
encoded once, in round 1; the generated ones as sampled, never rendered and re-encoded).
With guidance a third stream keeps the images but drops the round's instruction (the
text-unconditional stream of the two-scale CFG).
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

  def _collate(self, sequences, images_per_row: int = 1) -> dict:
    batch = mllm_sequence.collate_prompts(self._padded(sequences), images_per_row=images_per_row)
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
        state, jax.random.key(0), max_new=self.max_answer_tokens, pad_id=self.system.ids.pad,
        prompt_masks=[self.system.attention(batch)])
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
  def _generate(self, params, frozen, batch, others, rng, *, cfg_scale: float,
                temperature: float, top_k: int | None, top_p: float | None):
    """(images (b, H, W, 3), the final step state) for the conditional `batch` and the
    guidance streams' batches `others` (a tuple, possibly empty)."""
    batches = (batch,) + tuple(others)
    streams = [(self.system.embed(params, frozen, b, train=False, rng=None).embeds,
                b['attention_mask']) for b in batches]
    step_fn, state, n = self.system.image_step(
        params, frozen, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
        batch_size=batch['tokens'].shape[0])
    outputs, state = generation_loop.run(self.system.llm, params['llm'], streams, step_fn,
                                         state, rng, max_new=n, pad_id=self.system.ids.pad,
                                         block=self.system.generation_block,
                                         prompt_masks=[self.system.attention(b)
                                                       for b in batches])
    return self.system.render(params, frozen, outputs, state), state

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
    others = ()
    if cfg_scale != 1.0:
      others = (self._collate([self._unconditional()] * len(prompts)),)
    images, _ = self._generate(params, frozen, self._collate(sequences), others,
                               jax.random.key(seed), cfg_scale=float(cfg_scale),
                               temperature=float(temperature), top_k=top_k,
                               top_p=None if top_p is None else float(top_p))
    return np.asarray(jax.device_get(images))[:len(prompts)]

  def _unconditional(self):
    return mllm_sequence.unconditional_image_prompt(self.system.ids, self.system.image_slots)

  @functools.partial(jax.jit, static_argnums=(0,))
  def _image_latents(self, frozen, images):
    return self.system.image_latents(frozen, images)

  def _edit_prompt(self, instructions: Sequence[str], round_index: int, with_text: bool):
    """The encoded prompt of round `round_index` (0-based): images as placeholders (their
    latents come separately), the round's instruction left out unless `with_text`."""
    blank = np.zeros((self.system.image_slots.image_size,) * 2 + (3,), np.uint8)
    messages = []
    for r in range(round_index + 1):
      text = instructions[r] if (r < round_index or with_text) else ''
      content = ([{'type': 'image', 'image': blank}] if r == 0 else []) + [
          {'type': 'text', 'text': text}]
      messages.append({'role': 'user', 'content': content})
      if r < round_index:
        messages.append({'role': 'assistant', 'content': [{'type': 'image', 'image': blank}]})
    record = {'kind': 'editing', 'meta': {}, 'messages': messages}
    return mllm_sequence.encode_conversation(record, self.tokenizer, self.system.ids,
                                             self.system.image_slots,
                                             generation_prompt='image',
                                             template=self.chat_template)

  def _edit_batch(self, sequences, latents: jax.Array, images_per_row: int) -> dict:
    """Prompts as a batch whose images are `latents` (b, r, n, d), without pixels."""
    batch = mllm_sequence.collate_prompts(self._padded(sequences), images_per_row)
    batch = {k: v for k, v in batch.items() if k not in ('images', 'vit_tiles')}
    latents = np.asarray(jax.device_get(latents), np.float32)
    padded = np.zeros((len(batch['tokens']), images_per_row) + latents.shape[2:], np.float32)
    padded[:len(latents), :latents.shape[1]] = latents
    return self.place({**batch, 'image_latents': padded})

  def edit_round(self, params, frozen, context: np.ndarray, chains: Sequence[Sequence[str]],
                 *, cfg_scale: float = 1.0, temperature: float = 1.0,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Round r = context.shape[1] - 1 of b edits at once: context (b, r + 1, n, d) holds
    the latents of each start image and of its rounds 1..r; chains[i][:r + 1] are row i's
    instructions (every chain as long). Returns the round's images (b, S, S, 3) in [-1, 1]
    and latents (b, n, d)."""
    context = np.asarray(context, np.float32)
    b, r = len(context), context.shape[1] - 1
    images_per_row = len(chains[0])
    if len(chains) != b or any(len(c) != images_per_row for c in chains):
      raise ValueError(f'edit_round needs one chain per context row, all as long: got '
                       f'{[len(c) for c in chains]} for {b} rows')
    def prompts(with_text):
      return [self._edit_prompt(chain, r, with_text) for chain in chains]
    cond = self._edit_batch(prompts(True), context, images_per_row)
    others = ()
    if cfg_scale != 1.0:
      text_uncond = self._edit_batch(prompts(False), context, images_per_row)
      blank = self._edit_batch([self._unconditional()] * b, context[:, :0], images_per_row)
      others = (text_uncond, blank)
    rendered, state = self._generate(params, frozen, cond, others,
                                     jax.random.fold_in(jax.random.key(seed), r),
                                     cfg_scale=float(cfg_scale), temperature=float(temperature),
                                     top_k=None, top_p=None)
    latents = self.system.generated_latents(state)
    return (np.asarray(jax.device_get(rendered))[:b],
            np.asarray(jax.device_get(latents))[:b])

  def edit(self, params, frozen, images: np.ndarray, chains: Sequence[Sequence[str]], *,
           cfg_scale: float = 1.0, temperature: float = 1.0,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multi-round in-context editing of b images at once (module docstring).

    Args:
      images: (b, S, S, 3) float in [-1, 1] at the system's image size: encoded once, here.
      chains: b lists of instructions, one per round, all of the same length k.
    Returns:
      (images (b, k, S, S, 3) in [-1, 1], latents (b, k + 1, n, d): each start image's,
      then each round's).
    """
    if not self.system.edits_in_context:
      raise ValueError(f'{type(self.system).__name__} does not edit in context')
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(chains) != len(images) or not chains[0]:
      raise ValueError(f'edit needs images (b, S, S, 3) and b non-empty chains; got images '
                       f'{images.shape} and {len(chains)} chains')
    pixels = np.asarray(self._padded(list(images)))[:, None]
    start = self._image_latents(frozen, self.place({'images': pixels})['images'])
    latents = np.asarray(jax.device_get(start))[:len(images), :1]
    rounds = []
    for _ in chains[0]:
      image_r, latents_r = self.edit_round(params, frozen, latents, chains,
                                           cfg_scale=cfg_scale, temperature=temperature,
                                           seed=seed)
      rounds.append(image_r)
      latents = np.concatenate([latents, latents_r[:, None]], axis=1)
    return np.stack(rounds, axis=1), latents
