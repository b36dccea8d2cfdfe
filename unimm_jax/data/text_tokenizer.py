"""Text tokenizers for the LLM: a built-in byte-level one and HF `tokenizer.json` checkpoints.

Both implement `TextTokenizer`:

    encode(text) -> list[int]          plain text to ids; special-token strings in the text
                                       (`<|im_end|>`, ...) become their ids
    decode(ids, skip_special_tokens=False) -> str
    vocab_size                         ids are in [0, vocab_size)
    bos_id, eos_id, pad_id             int, or None where the tokenizer has no such token
    eos_ids                            tuple of the ids that end generation
    add_bos                            whether a training document starts with bos_id
    render_chat(messages, add_generation_prompt=False, **template_kwargs) -> str
    apply_chat_template(messages, add_generation_prompt=False, **template_kwargs) -> list[int]
    encode_document(text) -> list[int] a training document: [bos] + encode(text) + [eos]

`messages` is a list of `{'role': str, 'content': str}` dicts. Without a checkpoint chat
template the ChatML format of Qwen is used (`render_chatml`); a checkpoint's jinja template
is rendered the way `transformers` renders it, so `apply_chat_template` gives the ids that
`transformers.AutoTokenizer.apply_chat_template` gives for the same directory.

`load_tokenizer('byte')` is the byte tokenizer; `load_tokenizer(directory)` reads an HF
tokenizer directory (`HFTokenizer.from_dir`).
"""

from __future__ import annotations

import abc
import datetime
import functools
import json
import os
import re
from typing import Any, Sequence

import tokenizers

IM_START = '<|im_start|>'
IM_END = '<|im_end|>'

# The named special tokens that `transformers` hands to chat templates as `<name>` variables.
_TEMPLATE_SPECIAL_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                            'cls_token', 'mask_token')


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
  """Qwen's ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

  With `add_generation_prompt` the assistant header `<|im_start|>assistant\\n` follows, so
  the model continues with the answer. No default system prompt is inserted.
  """
  parts = []
  for i, message in enumerate(_check_messages(messages)):
    if not isinstance(message['content'], str):
      raise ValueError(f'messages[{i}]["content"] must be a str for the ChatML format, got '
                       f'{type(message["content"]).__name__}')
    parts.append(f'{IM_START}{message["role"]}\n{message["content"]}{IM_END}\n')
  if add_generation_prompt:
    parts.append(f'{IM_START}assistant\n')
  return ''.join(parts)


def _check_messages(messages: Sequence[dict]) -> list[dict]:
  """Plain-JSON copies of `messages`, keys with None values dropped (as transformers does).

  The copy keeps templates from mutating the caller's messages and from reaching methods of
  rich objects inside the sandbox.
  """
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
    raise ValueError(f'messages must be a non-empty list of dicts, got {messages!r:.80}')
  checked = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f'messages[{i}] must be a dict with "role" and "content", got '
                       f'{message!r:.80}')
    message = {k: v for k, v in message.items() if v is not None}
    if not isinstance(message.get('role'), str) or 'content' not in message:
      raise ValueError(f'messages[{i}] needs a str "role" and a "content", got {message!r:.80}')
    try:
      checked.append(json.loads(json.dumps(message)))
    except TypeError as err:
      raise ValueError(f'messages[{i}] holds a value that is not plain JSON data: {err}') from err
  return checked


class TextTokenizer(abc.ABC):
  """The interface the LM data pipeline, tasks and generation loops use (module docstring).

  Subclasses set the attributes `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `eos_ids` and
  `add_bos` in their constructor.
  """

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  eos_ids: tuple[int, ...]
  add_bos: bool

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`, special-token strings included as their ids; no bos/eos is added."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """The text of `ids` (any int sequence, e.g. an `int32 (n,)` array)."""

  @abc.abstractmethod
  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                  **template_kwargs: Any) -> str:
    """The prompt text of a conversation (see the module docstring for `messages`).

    `template_kwargs` are extra variables for a jinja chat template (e.g. Qwen3's
    `enable_thinking=False`); a template that does not read them ignores them.
    """

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                          **template_kwargs: Any) -> list[int]:
    """`encode(render_chat(...))`: the prompt ids, control tokens as single ids."""
    return self.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs))

  def encode_document(self, text: str) -> list[int]:
    """A training document: bos (when `add_bos`), the text's ids, then eos (if any)."""
    ids = self.encode(text)
    if self.add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if self.eos_id is not None:
      ids.append(self.eos_id)
    return ids


class ByteTokenizer(TextTokenizer):
  """Ids 0..255 are the UTF-8 bytes; `SPECIAL_TOKENS` follow from 256 (vocab_size 261).

  Needs no files, so demos and tests run anywhere. Any text round-trips exactly through
  encode/decode; ids that are not valid UTF-8 (e.g. sampled by a model) decode with U+FFFD
  replacement characters instead of failing, as do ids outside the vocabulary.
  """

  SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>', IM_START, IM_END)

  def __init__(self, add_bos: bool = True):
    self.special_ids = {token: 256 + i for i, token in enumerate(self.SPECIAL_TOKENS)}
    self.vocab_size = 256 + len(self.SPECIAL_TOKENS)
    self.pad_id = self.special_ids['<pad>']
    self.bos_id = self.special_ids['<bos>']
    self.eos_id = self.special_ids['<eos>']
    self.eos_ids = (self.eos_id, self.special_ids[IM_END])
    self.add_bos = add_bos
    self._special_pattern = re.compile('(' + '|'.join(map(re.escape, self.SPECIAL_TOKENS)) + ')')

  def encode(self, text: str) -> list[int]:
    ids = []
    # re.split with a capture group alternates plain text (even) and special tokens (odd).
    for i, piece in enumerate(self._special_pattern.split(text)):
      ids.extend([self.special_ids[piece]] if i % 2 else piece.encode('utf-8'))
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    parts, run = [], bytearray()
    for token in map(int, ids):
      if 0 <= token < 256:
        run.append(token)
        continue
      # A multi-byte character never spans a special token, so the run is decoded now.
      parts.append(run.decode('utf-8', errors='replace'))
      run = bytearray()
      if token >= self.vocab_size or token < 0:
        parts.append('\ufffd')
      elif not skip_special_tokens:
        parts.append(self.SPECIAL_TOKENS[token - 256])
    parts.append(run.decode('utf-8', errors='replace'))
    return ''.join(parts)

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                  **template_kwargs: Any) -> str:
    return render_chatml(messages, add_generation_prompt)

  def __repr__(self) -> str:
    return f'ByteTokenizer(add_bos={self.add_bos})'


class HFTokenizer(TextTokenizer):
  """A `tokenizers.Tokenizer` (an HF `tokenizer.json`) with its special tokens and template.

  `vocab_size` counts the added tokens too; a model's embedding table may be larger (Qwen
  pads it), which is fine: ids from this tokenizer are always below it. Decoding does not
  apply transformers' `clean_up_tokenization_spaces`, which transformers itself skips for
  the BPE tokenizers of LLMs.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *,
               special_tokens: dict[str, str] | None = None, add_bos: bool | None = None,
               chat_template: str | None = None, extra_eos_ids: Sequence[int] = (),
               name: str = 'tokenizer'):
    """Wraps `tokenizer`.

    Args:
      tokenizer: the tokenizer.
      special_tokens: `transformers` names (`bos_token`, `eos_token`, `pad_token`, ...) to
        token strings; bos, eos and pad must be in the vocabulary.
      add_bos: whether documents start with bos; None asks the tokenizer's post-processor
        (what transformers does with a tokenizer.json).
      chat_template: a jinja chat template; None uses `render_chatml` and makes `<|im_end|>`
        (if in the vocabulary) end generation.
      extra_eos_ids: ids that end generation besides eos (generation_config.json's).
      name: what error messages call this tokenizer (its directory).
    """
    self._tokenizer = tokenizer
    self.name = name
    self.special_tokens = dict(special_tokens or {})
    self.chat_template = chat_template
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {}
    # Only these need ids; the other named tokens are just strings for the chat template.
    for key in ('bos_token', 'eos_token', 'pad_token'):
      token = self.special_tokens.get(key)
      ids[key] = None if token is None else tokenizer.token_to_id(token)
      if token is not None and ids[key] is None:
        raise ValueError(f'{name}: {key} {token!r} is not in the vocabulary of tokenizer.json')
    self.bos_id, self.eos_id, self.pad_id = ids['bos_token'], ids['eos_token'], ids['pad_token']
    if add_bos is None:
      add_bos = self.bos_id is not None and self._post_processor_adds_bos()
    self.add_bos = bool(add_bos) and self.bos_id is not None
    eos_ids = [self.eos_id, *extra_eos_ids]
    if chat_template is None:
      eos_ids.append(tokenizer.token_to_id(IM_END))
    self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None))

  def _post_processor_adds_bos(self) -> bool:
    with_specials = self._tokenizer.encode('a', add_special_tokens=True).ids
    plain = self._tokenizer.encode('a', add_special_tokens=False).ids
    return with_specials[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

  @classmethod
  def from_dir(cls, path: str) -> 'HFTokenizer':
    """Reads `tokenizer.json` and, when present, the files that complete it.

    `tokenizer_config.json`: the special tokens (strings or `{"content": ...}` dicts),
    `add_bos_token` (overrides what the post-processor does) and `chat_template` (a string,
    or a list of `{"name", "template"}` of which `default` is used); a `chat_template.jinja`
    file takes precedence over it, as in transformers. `generation_config.json`:
    `eos_token_id` (an int or a list), added to `eos_ids`.

    Raises:
      FileNotFoundError: `path` has no tokenizer.json.
      ValueError: a file is malformed; the message names the file and key.
    """
    tokenizer_file = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(tokenizer_file):
      raise FileNotFoundError(f'{tokenizer_file} does not exist; a tokenizer directory needs '
                              "an HF tokenizer.json (or use the tokenizer 'byte')")
    try:
      tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
    # The Rust loader reports every parse problem as a plain Exception.
    except Exception as err:  # pylint: disable=broad-exception-caught
      raise ValueError(f'{tokenizer_file} could not be read: {err}') from err

    config_file = os.path.join(path, 'tokenizer_config.json')
    config = _read_json_object(config_file)
    special_tokens = {}
    for key in _TEMPLATE_SPECIAL_TOKENS:
      value = config.get(key)
      if isinstance(value, dict):
        value = value.get('content')
      if value is not None and not isinstance(value, str):
        raise ValueError(f'{config_file}: {key} must be a string or a dict with a "content" '
                         f'string, got {config[key]!r}')
      if value is not None:
        special_tokens[key] = value
    add_bos = config.get('add_bos_token')
    if add_bos is not None and not isinstance(add_bos, bool):
      raise ValueError(f'{config_file}: add_bos_token must be true or false, got {add_bos!r}')
    chat_template = _config_chat_template(config, config_file)
    template_file = os.path.join(path, 'chat_template.jinja')
    if os.path.isfile(template_file):
      with open(template_file, encoding='utf-8') as f:
        chat_template = f.read()

    generation_file = os.path.join(path, 'generation_config.json')
    eos = _read_json_object(generation_file).get('eos_token_id')
    eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_list):
      raise ValueError(f'{generation_file}: eos_token_id must be an int or a list of ints, got '
                       f'{eos!r}')
    return cls(tokenizer, special_tokens=special_tokens, add_bos=add_bos,
               chat_template=chat_template, extra_eos_ids=eos_list, name=path)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                  **template_kwargs: Any) -> str:
    if self.chat_template is None:
      return render_chatml(messages, add_generation_prompt)
    template = _compile_chat_template(self.chat_template)
    # As in transformers: the named special tokens are variables, caller kwargs override them.
    variables = {**self.special_tokens, **template_kwargs}
    import jinja2  # pylint: disable=g-import-not-at-top  (loaded by the compile above)
    try:
      return template.render(messages=_check_messages(messages), tools=None, documents=None,
                             add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as err:  # raise_exception(...) in the template, or the sandbox
      raise ValueError(f'{self.name}: the chat template failed: {err}') from err

  def __repr__(self) -> str:
    return f'HFTokenizer({self.name!r}, vocab_size={self.vocab_size})'


def _read_json_object(path: str) -> dict:
  """The JSON object in `path`; `{}` when the file does not exist."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f'{path} could not be read as JSON: {err}') from err
  if not isinstance(data, dict):
    raise ValueError(f'{path} must hold a JSON object, got {type(data).__name__}')
  return data


def _config_chat_template(config: dict, config_file: str) -> str | None:
  """`chat_template` of tokenizer_config.json: a string, or the `default` of a named list."""
  template = config.get('chat_template')
  if template is None or isinstance(template, str):
    return template
  if isinstance(template, list) and all(
      isinstance(t, dict) and isinstance(t.get('name'), str) and
      isinstance(t.get('template'), str) for t in template):
    named = {t['name']: t['template'] for t in template}
    if 'default' not in named:
      raise ValueError(f'{config_file}: chat_template lists {sorted(named)} but no "default"')
    return named['default']
  raise ValueError(f'{config_file}: chat_template must be a string or a list of '
                   f'{{"name", "template"}} objects, got {type(template).__name__}')


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str):
  """The jinja template of `source` in transformers' environment (cached per source).

  Checkpoint templates are untrusted code, hence the immutable sandbox. trim_blocks and
  lstrip_blocks change the rendered whitespace, and templates are written for them; the
  globals and the `tojson` filter are the ones transformers provides, and `{% generation %}`
  blocks (assistant-mask markers) render their body unchanged.
  """
  # Imported here: only jinja templates need jinja2, the byte tokenizer and ChatML do not.
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext as jinja_ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  class GenerationBlock(jinja_ext.Extension):
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method('_render_body'), [], [],
                                    body).set_lineno(lineno)

    def _render_body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(date_format):
    return datetime.datetime.now().strftime(date_format)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[GenerationBlock, jinja_ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = strftime_now
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as err:
    raise ValueError(f'chat template syntax error at line {err.lineno}: {err.message}') from err


def load_tokenizer(spec: str) -> TextTokenizer:
  """`'byte'` -> `ByteTokenizer()`; `'scene_words'` -> the word-level tokenizer of the
  procedural scenes (`scene_tokenizer.SceneWordTokenizer`), `'scene_edit_words'` the same
  with the editing instructions' words after them; a directory ->
  `HFTokenizer.from_dir(spec)`."""
  if spec == 'byte':
    return ByteTokenizer()
  if spec in ('scene_words', 'scene_edit_words'):
    # Imported here: scene_tokenizer subclasses TextTokenizer from this module.
    from unimm_jax.data import scene_tokenizer  # pylint: disable=g-import-not-at-top
    return scene_tokenizer.SceneWordTokenizer(edits=spec == 'scene_edit_words')
  if not isinstance(spec, str) or not os.path.isdir(spec):
    raise ValueError(f"tokenizer {spec!r} is neither 'byte', 'scene_words', "
                     "'scene_edit_words' nor a directory holding an HF tokenizer.json")
  return HFTokenizer.from_dir(spec)
