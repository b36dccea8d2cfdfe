"""The one KV-cached generation loop, for text LMs and every unified system.

A generation has one or more *streams* that share a batch and the sampled outputs: the
conditional prompt, and for classifier-free guidance an unconditional one (any other
length, its own KV cache). Each stream is prefilled from input embeddings, so a system can
splice image features into its prompt. Then one `jax.lax.while_loop` asks a `step_fn` for
the next output from every stream's last hidden state and feeds the embedding it returns
to every stream:

    step_fn(hidden, state, rng, step) -> (token, next_embeds, state, done)
      hidden       list over streams of (b, hidden_size) final-normed hidden states
      state        the caller's pytree (e.g. where a row is inside an image, or latents)
      rng          a key for this step (the root key folded with the step)
      step         () int32, the index of the output being produced
      token        (b,) int32, written to the outputs (finished rows get pad_id instead)
      next_embeds  (b, hidden_size) what every stream reads next
      done         (b,) bool, this row has finished (after this output)

With `block` = P > 1 (a system that writes P outputs at once, BitDance's parallel head) a
step reads the last P hidden states of each stream, `hidden` (b, P, hidden_size), and feeds
P embeddings, `next_embeds` (b, P, hidden_size), that see each other (bidirectional inside
the block, causal to everything before); the prompt's last P tokens are such a block too
(BitDance's [res_w] and P - 1 queries). `token` stays one (b,) value per step.

The loop stops after `max_new` steps or when every row is done. The caller owns what a
token means (a vocabulary id, or an index into a state that holds continuous latents) and
how logits are formed (CFG, grammar masks, a flow head), so the loop has no branch on a
model or a system. Prompts are LEFT-padded: every row ends at the same slot, and RoPE
positions count only real tokens, as transformers numbers a left-padded batch.
"""
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from unimm_jax.models import llm
from unimm_jax.nn import masks

StepFn = Callable[[list, Any, jax.Array, jax.Array], tuple]


def _prefill(model: llm.LLM, params, embeds: jax.Array, mask: jax.Array,
             cache: llm.KVCache, block: int, spec: masks.MaskSpec | None = None
             ) -> tuple[jax.Array, llm.KVCache]:
  """Writes a stream's embeddings (b, s, d) into its cache under `spec` (orders relative to
  the cache's first new slot), by default causal with the last `block` of them one
  bidirectional block; returns the last hidden state (b, d), or the last `block`
  (b, block, d) when block > 1."""
  b, s = embeds.shape[:2]
  if spec is None:
    order = jnp.minimum(jnp.arange(s, dtype=jnp.int32), s - block)
    spec = masks.MaskSpec(jnp.broadcast_to(order, (b, s)))
  hidden, cache = model.apply({'params': params}, inputs_embeds=embeds, attention_mask=mask,
                              mask=masks.MaskSpec(cache.index + spec.order),
                              cache=cache, method=llm.LLM.hidden_states)
  return (hidden[:, -1] if block == 1 else hidden[:, -block:]), cache


def run(model: llm.LLM, params, streams: Sequence[tuple[jax.Array, jax.Array]],
        step_fn: StepFn, state: Any, rng: jax.Array, *, max_new: int,
        pad_id: jax.Array | int = 0, block: int = 1,
        prompt_masks: Sequence[masks.MaskSpec | None] | None = None
        ) -> tuple[jax.Array, Any]:
  """Generates up to `max_new` outputs per row (trace it inside `jax.jit`).

  Args:
    model, params: the LLM and its 'params' collection.
    streams: per stream (embeds (b, s_i, d), attention_mask (b, s_i) bool), LEFT-padded;
      the first stream is the conditional one.
    step_fn: see the module docstring.
    state: step_fn's initial state.
    rng: root key; step i uses `fold_in(rng, i)`.
    max_new: outputs (steps) per row (static).
    pad_id: written in place of outputs after a row is done.
    block: embeddings fed per step (static; module docstring).
    prompt_masks: per stream, the mask its prompt was trained under (a system's
      `attention(batch)`, e.g. bidirectional blocks inside earlier generated images), or
      None: causal with the last `block` tokens one block.
  Returns:
    (outputs (b, max_new) int32, final state).
  """
  if block < 1 or any(embeds.shape[1] < block for embeds, _ in streams):
    raise ValueError(f'block={block} must be >= 1 and no longer than every prompt')
  batch = streams[0][0].shape[0]
  # The last output is never fed back, so the caches need (max_new - 1) blocks after the
  # prompt.
  caches = [llm.init_cache(model.config, batch, embeds.shape[1] + (max_new - 1) * block)
            for embeds, _ in streams]
  prompt_masks = prompt_masks or [None] * len(streams)
  prefilled = [_prefill(model, params, embeds, mask, cache, block, spec)
               for (embeds, mask), cache, spec in zip(streams, caches, prompt_masks)]
  hidden, caches = [h for h, _ in prefilled], [c for _, c in prefilled]
  token, embeds, state, done = step_fn(hidden, state, jax.random.fold_in(rng, 0),
                                       jnp.zeros((), jnp.int32))
  outputs = jnp.full((batch, max_new), pad_id, jnp.int32).at[:, 0].set(token)
  ones = jnp.ones((batch, block), bool)

  def cond(carry):
    step, _, _, _, _, done = carry
    return (step < max_new) & ~jnp.all(done)

  def body(carry):
    step, caches, embeds, state, outputs, done = carry
    fed = [_prefill(model, params, embeds[:, None] if block == 1 else embeds, ones, cache,
                    block) for cache in caches]
    hidden, caches = [h for h, _ in fed], [c for _, c in fed]
    token, embeds, state, now_done = step_fn(hidden, state, jax.random.fold_in(rng, step), step)
    # Finished rows keep decoding their own samples; only what is written is replaced.
    written = jnp.where(done, jnp.asarray(pad_id, jnp.int32), token)
    outputs = jax.lax.dynamic_update_slice(outputs, written[:, None], (0, step))
    return step + 1, caches, embeds, state, outputs, done | now_done

  carry = (jnp.ones((), jnp.int32), caches, embeds, state, outputs, done)
  _, _, _, state, outputs, _ = jax.lax.while_loop(cond, body, carry)
  return outputs, state


def embed_ids(model: llm.LLM, params, ids: jax.Array) -> jax.Array:
  """(b, s) token ids -> (b, s, d) input embeddings of the LLM."""
  return model.apply({'params': params}, ids, method=llm.LLM.embed)


def logits(model: llm.LLM, params, hidden: jax.Array) -> jax.Array:
  """(b, d) hidden states -> (b, vocab) float32 logits of the LM head."""
  return model.apply({'params': params}, hidden[:, None], method=llm.LLM.logits)[:, 0]


def greedy_text_step(model: llm.LLM, params, allowed: jax.Array, eos_id: int) -> StepFn:
  """A step_fn for greedy answers: the most likely of the `allowed` (vocab,) bool ids from
  the first stream, fed back through the LLM's embedding; a row is done at `eos_id`."""

  def step_fn(hidden, state, rng, step):
    del rng, step
    scores = jnp.where(allowed, logits(model, params, hidden[0]), -jnp.inf)
    token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return token, embed_ids(model, params, token[:, None])[:, 0], state, token == eos_id

  return step_fn
