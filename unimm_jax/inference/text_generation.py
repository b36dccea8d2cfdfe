"""Text in, text out with a trained or imported LLM and its tokenizer (`--mode=generate`)."""
import jax
import numpy as np

from unimm_jax.data.text_tokenizer import TextTokenizer
from unimm_jax.inference import sampling
from unimm_jax.models.llm import LLM


def prompt_ids(tokenizer: TextTokenizer, prompt: str, chat: bool) -> list[int]:
  """A plain prompt starts like a training document (bos when the tokenizer adds one); a
  chat prompt is one user turn through the tokenizer's chat template, ready for the reply."""
  if chat:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
  ids = tokenizer.encode(prompt)
  if tokenizer.add_bos and tokenizer.bos_id is not None:
    ids = [tokenizer.bos_id] + ids
  return ids


def generate_text(model: LLM, params, tokenizer: TextTokenizer, prompt: str, *,
                  max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, chat: bool = False, seed: int = 0) -> str:
  """The continuation of `prompt` (without the prompt), stopping at the tokenizer's EOS."""
  ids = np.asarray([prompt_ids(tokenizer, prompt, chat)], np.int32)
  new = sampling.generate(model, params, ids, max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, eos_ids=tokenizer.eos_ids,
                          rng=jax.random.key(seed) if temperature > 0 else None)
  new = np.asarray(new)[0].tolist()
  eos = [i for i, t in enumerate(new) if t in tokenizer.eos_ids]
  return tokenizer.decode(new[:eos[0]] if eos else new, skip_special_tokens=True)
