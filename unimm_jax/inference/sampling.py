"""Token sampling and KV-cached generation for `unimm_jax.models.llm.LLM`.

Generation runs the shared loop of `unimm_jax.inference.generation_loop`: it prefills the
prompt into a `KVCache`, samples the first new token from the last prompt position, then
feeds each sampled token back (one decode step per token) until `max_new_tokens` tokens
exist or every row has produced an EOS. Prompts are LEFT-padded (`attention_mask` 0 on the left): every row then
ends at the same slot, and RoPE positions count only real tokens, as in transformers.

Logit processing order (transformers' order): CFG combination, temperature, top-k, top-p,
then a categorical draw; temperature 0 is greedy (argmax of the combined logits).
temperature, top_k, top_p and max_new_tokens are compile-time constants (a new value
compiles again); eos_ids, pad_id and cfg_scale are not.
"""
import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp

from unimm_jax.inference import generation_loop
from unimm_jax.models import llm


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row (and any tied with the k-th), others -> -inf.

  Shapes: (..., vocab) -> (..., vocab). k >= vocab keeps everything.
  """
  if k < 1:
    raise ValueError(f'top_k={k} must be >= 1')
  if k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the most probable tokens whose probabilities reach `p`.

  A token is kept when the probability mass of the tokens ranked above it is below p, so
  the kept set is the smallest one with mass >= p, and the most probable token is always
  kept (even for p = 0). Tokens tied with the last kept one are kept too. Others -> -inf.

  Shapes: (..., vocab) -> (..., vocab).
  """
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'top_p={p} must be in [0, 1]')
  if p == 1.0:  # everything, even tokens whose mass float32 cannot add to the total
    return logits
  ranked = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(ranked.astype(jnp.float32), axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_above < p).at[..., 0].set(True)
  num_kept = jnp.sum(keep, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(ranked, num_kept - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def cfg_combine(cond_logits: jax.Array, uncond_logits: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance on raw logits: uncond + scale * (cond - uncond).

  scale 1 gives the conditional logits, 0 the unconditional ones. Suppressed tokens (float32
  min in both) stay at float32 min.
  """
  return uncond_logits + scale * (cond_logits - uncond_logits)


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """One token per row. Shapes: (b, vocab) float -> (b,) int32.

  temperature 0: argmax (rng unused). Otherwise logits / temperature, then the top-k and
  top-p filters when given, then a categorical draw with `rng`.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0')
  if rng is None:
    raise ValueError('sampling with temperature > 0 needs an rng key')
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    logits = top_k_filter(logits, top_k)
  if top_p is not None:
    logits = top_p_filter(logits, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p'))
def _generate(model: llm.LLM, params, prompts, rng, eos_ids: jax.Array, pad_id: jax.Array,
              cfg_scale: jax.Array, *, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None) -> jax.Array:
  """prompts: ((ids, mask),) or, with CFG, (conditional, unconditional), each its own cache.

  eos_ids (n,), pad_id () and cfg_scale () (read only with two prompts) are traced. Runs
  `generation_loop.run` with a step that samples text from the (combined) logits.
  """
  streams = [(generation_loop.embed_ids(model, params, ids), mask) for ids, mask in prompts]

  def step_fn(hidden, state, step_rng, step):
    del step
    logits = [generation_loop.logits(model, params, h) for h in hidden]
    combined = logits[0] if len(logits) == 1 else cfg_combine(logits[0], logits[1], cfg_scale)
    token = sample_logits(combined, step_rng, temperature, top_k, top_p)
    done = jnp.any(token[:, None] == eos_ids[None, :], axis=1)
    return token, generation_loop.embed_ids(model, params, token[:, None])[:, 0], state, done

  outputs, _ = generation_loop.run(model, params, streams, step_fn, (), rng,
                                   max_new=max_new_tokens, pad_id=pad_id)
  return outputs


def _prepare(input_ids, attention_mask, name: str):
  input_ids = jnp.asarray(input_ids, jnp.int32)
  chex.assert_rank(input_ids, 2)
  if attention_mask is None:
    return input_ids, jnp.ones_like(input_ids, bool)
  attention_mask = jnp.asarray(attention_mask).astype(bool)
  chex.assert_equal_shape([input_ids, attention_mask])
  # Decoding appends at the right end of every row, so padding must all be on the left.
  if not bool(jnp.all(attention_mask[:, -1])):
    raise ValueError(f'{name}: every row must end with a real token (pad on the LEFT)')
  return input_ids, attention_mask


def _common_args(max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, rng):
  """(traced args of _generate, its static keyword args)."""
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if temperature > 0 and rng is None:
    raise ValueError('sampling with temperature > 0 needs an rng key')
  eos_ids = [int(e) for e in eos_ids]
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0
  # -1 matches no token: no EOS and one EOS then share a shape, hence one compilation.
  traced = (jax.random.key(0) if rng is None else rng, jnp.asarray(eos_ids or [-1], jnp.int32),
            jnp.asarray(pad_id, jnp.int32))
  return traced, dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                      top_k=top_k, top_p=top_p)


def generate(model: llm.LLM, params, input_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_ids: Sequence[int] = (), rng: jax.Array | None = None,
             attention_mask=None, *, pad_id: int | None = None) -> jax.Array:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model, params: the LLM and its params (the 'params' collection).
    input_ids: (b, s) prompts, LEFT-padded.
    max_new_tokens: tokens to produce per row.
    temperature, top_k, top_p: see `sample_logits`; temperature 0 is greedy.
    eos_ids: ids that end a row; generation stops once every row has produced one.
    rng: key for sampling (required when temperature > 0).
    attention_mask: (b, s) 1 for real tokens, 0 for left padding; None: no padding.
    pad_id: fills each row after its first EOS (the EOS itself is kept) and every row
      after an early stop; default eos_ids[0] (0 without EOS ids), which is what
      transformers writes when pad_token_id is unset.
  Returns:
    (b, max_new_tokens) int32 new token ids.
  """
  input_ids, attention_mask = _prepare(input_ids, attention_mask, 'input_ids')
  traced, static = _common_args(max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, rng)
  return _generate(model, params, ((input_ids, attention_mask),), *traced,
                   jnp.zeros((), jnp.float32), **static)


def generate_cfg(model: llm.LLM, params, input_ids, uncond_input_ids, max_new_tokens: int,
                 cfg_scale: float, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_ids: Sequence[int] = (),
                 rng: jax.Array | None = None, attention_mask=None,
                 uncond_attention_mask=None, *, pad_id: int | None = None) -> jax.Array:
  """Generation with classifier-free guidance from a conditional and an unconditional prompt.

  Each prompt (same batch size, any lengths, each LEFT-padded) has its own KV cache; at
  every step both are run and the next token is sampled from
  `uncond + cfg_scale * (cond - uncond)` on raw logits (`cfg_combine`), then appended to
  both streams. Other arguments and the result are as in `generate`.
  """
  input_ids, attention_mask = _prepare(input_ids, attention_mask, 'input_ids')
  uncond_input_ids, uncond_attention_mask = _prepare(uncond_input_ids, uncond_attention_mask,
                                                     'uncond_input_ids')
  if input_ids.shape[0] != uncond_input_ids.shape[0]:
    raise ValueError(f'conditional batch {input_ids.shape[0]} != unconditional batch '
                     f'{uncond_input_ids.shape[0]}')
  traced, static = _common_args(max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, rng)
  prompts = ((input_ids, attention_mask), (uncond_input_ids, uncond_attention_mask))
  return _generate(model, params, prompts, *traced, jnp.asarray(cfg_scale, jnp.float32),
                   **static)
