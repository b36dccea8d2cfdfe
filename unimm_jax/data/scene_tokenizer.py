"""A word-level text tokenizer for the scene demo: `load_tokenizer('scene_words')`.

Ids: `SPECIAL_TOKENS` first (`<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3, `<user>` 4,
`<assistant>` 5), then every word, digit and punctuation mark of
`scene_conversations.vocabulary()` in sorted order (78 ids in all). The word list is
derived from the scene templates, so every text they produce encodes without `<unk>`.
`SceneWordTokenizer(edits=True)` appends the few words of the editing instructions
(`scene_edits`; `vocabulary(edits=True)`), so ids 0-77 stay those of the plain tokenizer.

Encoding splits text into words (runs of letters), single digits, punctuation marks and
special-token strings; a word not in the vocabulary is looked up lower-cased, then
capitalised ('WHAT' -> 'What'), then becomes `<unk>` (never an error). Decoding joins
pieces with single spaces, without a space before `. , ? : ; !`; so `decode(encode(t)) == t`
for every template text (single spaces, no space before punctuation). `<eos>` ends a turn
and ends generation.

Chat format (`render_chat`): `<user> What colour is the circle? <eos> <assistant> red
<eos>`, with the role as a special token; `add_generation_prompt` appends `<assistant>`.
Roles are 'user' and 'assistant'; content is a str.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from unimm_jax.data.scene_conversations import WORD_PATTERN, vocabulary
from unimm_jax.data.text_tokenizer import TextTokenizer

SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>', '<unk>', '<user>', '<assistant>')
ROLES = ('user', 'assistant')
_NO_SPACE_BEFORE = frozenset('.,?:;!')


class SceneWordTokenizer(TextTokenizer):
  """Word-level tokenizer over the scene templates' vocabulary (module docstring)."""

  def __init__(self, add_bos: bool = True, edits: bool = False):
    self.tokens = SPECIAL_TOKENS + vocabulary(edits)
    self.ids = {token: i for i, token in enumerate(self.tokens)}
    if len(self.ids) != len(self.tokens):
      raise ValueError('scene vocabulary repeats a special token')
    self.vocab_size = len(self.tokens)
    self.pad_id, self.bos_id, self.eos_id = (self.ids[t] for t in ('<pad>', '<bos>', '<eos>'))
    self.unk_id = self.ids['<unk>']
    self.eos_ids = (self.eos_id,)
    self.add_bos = add_bos
    specials = '|'.join(map(re.escape, SPECIAL_TOKENS))
    self._pattern = re.compile(f'{specials}|{WORD_PATTERN.pattern}')

  def pieces(self, text: str) -> list[str]:
    """The pieces of `text`: special-token strings, words, digits, punctuation marks."""
    return self._pattern.findall(text)

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self.pieces(text):
      for form in (piece, piece.lower(), piece.capitalize()):
        if form in self.ids:
          ids.append(self.ids[form])
          break
      else:
        ids.append(self.unk_id)
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Pieces joined by spaces (none before punctuation); ids outside the vocab -> `<unk>`."""
    words = []
    for token in map(int, ids):
      word = self.tokens[token] if 0 <= token < self.vocab_size else '<unk>'
      if skip_special_tokens and word in SPECIAL_TOKENS:
        continue
      if words and word in _NO_SPACE_BEFORE:
        words[-1] += word
      else:
        words.append(word)
    return ' '.join(words)

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                  **template_kwargs: Any) -> str:
    """`<role> content <eos>` per message, space-separated (`template_kwargs` unused)."""
    if isinstance(messages, (str, bytes)) or not messages:
      raise ValueError(f'messages must be a non-empty list of dicts, got {messages!r:.80}')
    parts = []
    for i, message in enumerate(messages):
      role = message.get('role') if isinstance(message, dict) else None
      content = message.get('content') if isinstance(message, dict) else None
      if role not in ROLES or not isinstance(content, str):
        raise ValueError(f'messages[{i}] needs a role in {ROLES} and a str content, got '
                         f'{message!r:.80}')
      parts.append(f'<{role}> {content} <eos>')
    if add_generation_prompt:
      parts.append('<assistant>')
    return ' '.join(parts)

  def __repr__(self) -> str:
    return f'SceneWordTokenizer(vocab_size={self.vocab_size}, add_bos={self.add_bos})'
