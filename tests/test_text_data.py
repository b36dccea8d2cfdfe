"""Tests of the LM text data: tokenizers, chat templates, corpora, packing, Grain iterators."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from unimm_jax.data import text_corpus, text_packing, text_tokenizer
from unimm_jax.data.text_data_config import default_text_data_config, validate_text_data_config
from unimm_jax.data.transforms import Unreadable

ROW_FIELDS = ('tokens', 'segment_ids', 'positions', 'targets', 'loss_mask', 'skipped')

# Qwen2's template written with bare block tags on their own lines, so it renders ChatML
# only with trim_blocks and lstrip_blocks; it also reads a special-token variable and calls
# raise_exception, the other two things transformers' environment provides.
QWEN2_STYLE_TEMPLATE = """\
{% if messages[0]['role'] == 'assistant' %}
  {{ raise_exception('the conversation must not start with the assistant') }}
{% endif %}
{% for message in messages %}
  {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% elif messages[-1]['role'] == 'assistant' %}
{{ eos_token }}
{% endif %}
"""

CONVERSATIONS = (
    [{'role': 'user', 'content': 'Hello there, how are you?'}],
    [{'role': 'system', 'content': 'You answer in French.'},
     {'role': 'user', 'content': 'What is a token? Réponds vite.'},
     {'role': 'assistant', 'content': 'Un jeton est un morceau de texte.'},
     {'role': 'user', 'content': 'Merci <|im_end|> beaucoup!'}],
)

TEXTS = ('The quick brown fox jumps over the lazy dog.', 'naïve café — 日本語 🙂',
         'one<|im_start|>two<|im_end|>\nthree<|endoftext|>', '', '   spaces  and\ttabs\n\n')


def _write_json(path, data):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f)


def _save_hf_tokenizer(directory, *, chat_template=QWEN2_STYLE_TEMPLATE, bos_processor=False):
  """A small byte-level BPE (Qwen2 layout) trained on a few sentences, saved like a checkpoint."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [' '.join(TEXTS), 'You are a helpful assistant. How are you? I am fine, thanks.',
            'A token is a piece of text; tokenizers split text into tokens.'] * 5
  tokenizer.train_from_iterator(corpus, trainer)
  if bos_processor:
    bos = tokenizer.token_to_id('<|endoftext|>')
    tokenizer.post_processor = processors.TemplateProcessing(
        single='<|endoftext|> $A', special_tokens=[('<|endoftext|>', bos)])
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': 1024,
            'eos_token': '<|im_end|>', # Older checkpoints spell a token as a serialized AddedToken.
            'pad_token': {'__type': 'AddedToken', 'content': '<|endoftext|>', 'lstrip': False,
                          'normalized': False, 'rstrip': False, 'single_word': False},
            'bos_token': '<|endoftext|>' if bos_processor else None}
  if chat_template is not None:
    config['chat_template'] = chat_template
  _write_json(os.path.join(directory, 'tokenizer_config.json'), config)
  _write_json(os.path.join(directory, 'generation_config.json'),
              {'eos_token_id': [tokenizer.token_to_id(t) for t in ('<|im_end|>', '<|endoftext|>')]})
  return directory


@pytest.fixture(name='hf_dir', scope='module')
def fixture_hf_dir(tmp_path_factory):
  return _save_hf_tokenizer(str(tmp_path_factory.mktemp('qwen_style')))


def _text_config(**overrides):
  cfg = default_text_data_config()
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_text_and_special_tokens():
  tok = text_tokenizer.ByteTokenizer()
  for text in TEXTS + ('<bos>x<eos><pad>',):
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode('é') == list('é'.encode('utf-8'))
  assert tok.encode('a<|im_start|>b<eos>') == [97, 259, 98, tok.eos_id]
  assert tok.decode([97, tok.bos_id, 98], skip_special_tokens=True) == 'ab'
  # Invalid UTF-8 and ids outside the vocabulary decode with replacement characters.
  assert tok.decode([0xFF, 65, 0xE6, 0x97]) == '\ufffdA\ufffd'
  assert tok.decode(np.array([65, 999, -1, 66])) == 'A\ufffd\ufffdB'
  assert tok.vocab_size == 261 and tok.pad_id == 256
  assert tok.eos_ids == (tok.eos_id, tok.encode('<|im_end|>')[0])
  assert tok.encode_document('hi') == [tok.bos_id, 104, 105, tok.eos_id]


def test_byte_tokenizer_chat_is_chatml():
  tok = text_tokenizer.load_tokenizer('byte')
  messages = CONVERSATIONS[1][:2]
  expected = ('<|im_start|>system\nYou answer in French.<|im_end|>\n'
              '<|im_start|>user\nWhat is a token? Réponds vite.<|im_end|>\n')
  assert tok.render_chat(messages) == expected
  ids = tok.apply_chat_template(messages, add_generation_prompt=True)
  assert ids == tok.encode(expected + '<|im_start|>assistant\n')
  assert ids.count(tok.encode('<|im_start|>')[0]) == 3
  with pytest.raises(ValueError, match='role'):
    tok.render_chat([{'content': 'no role'}])
  with pytest.raises(ValueError, match='non-empty list'):
    tok.render_chat([])


@pytest.mark.parity
def test_hf_tokenizer_matches_transformers(hf_dir):
  transformers = pytest.importorskip('transformers')
  ours = text_tokenizer.load_tokenizer(hf_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
        ids, skip_special_tokens=True)
  for messages in CONVERSATIONS:
    for add_generation_prompt in (False, True):
      rendered = theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=False)
      assert ours.render_chat(messages, add_generation_prompt) == rendered
      assert ours.apply_chat_template(messages, add_generation_prompt) == (
          theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                     tokenize=True, return_dict=False))
  # The template is ChatML: with a system prompt it equals the built-in rendering.
  assert ours.render_chat(CONVERSATIONS[1][:3]) == (
      text_tokenizer.render_chatml(CONVERSATIONS[1][:3]) + '<|im_end|>\n')
  im_end, endoftext = ours.encode('<|im_end|><|endoftext|>')
  assert (ours.eos_id, ours.pad_id, ours.bos_id) == (im_end, endoftext, None)
  assert ours.eos_ids == (im_end, endoftext) and not ours.add_bos
  assert ours.vocab_size == len(theirs)
  with pytest.raises(ValueError, match='must not start with the assistant'):
    ours.render_chat([{'role': 'assistant', 'content': 'hi'}])


@pytest.mark.parity
def test_hf_tokenizer_bos_from_post_processor(tmp_path):
  transformers = pytest.importorskip('transformers')
  directory = _save_hf_tokenizer(str(tmp_path / 'bos'), bos_processor=True)
  ours = text_tokenizer.HFTokenizer.from_dir(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  assert ours.add_bos and ours.bos_id == ours.encode('<|endoftext|>')[0]
  document = ours.encode_document(TEXTS[0])
  assert document == theirs.encode(TEXTS[0]) + [ours.eos_id]


def test_hf_tokenizer_without_template_uses_chatml(tmp_path):
  directory = _save_hf_tokenizer(str(tmp_path / 'plain'), chat_template=None)
  tok = text_tokenizer.load_tokenizer(directory)
  messages = CONVERSATIONS[1]
  assert tok.render_chat(messages, True) == text_tokenizer.render_chatml(messages, True)
  assert tok.encode('<|im_end|>')[0] in tok.eos_ids


def test_hf_tokenizer_errors_name_the_file(tmp_path, hf_dir):
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    text_tokenizer.HFTokenizer.from_dir(str(tmp_path))
  with pytest.raises(ValueError, match='neither'):
    text_tokenizer.load_tokenizer(str(tmp_path / 'missing'))
  bad = tmp_path / 'bad'
  bad.mkdir()
  with open(os.path.join(hf_dir, 'tokenizer.json'), encoding='utf-8') as f:
    (bad / 'tokenizer.json').write_text(f.read())
  (bad / 'tokenizer_config.json').write_text('{"eos_token": 5}')
  with pytest.raises(ValueError, match='tokenizer_config.json.*eos_token'):
    text_tokenizer.HFTokenizer.from_dir(str(bad))
  (bad / 'tokenizer_config.json').write_text('{not json')
  with pytest.raises(ValueError, match='tokenizer_config.json'):
    text_tokenizer.HFTokenizer.from_dir(str(bad))
  (bad / 'tokenizer_config.json').write_text('{"eos_token": "<|no_such_token|>"}')
  with pytest.raises(ValueError, match='not in the vocabulary'):
    text_tokenizer.HFTokenizer.from_dir(str(bad))
  (bad / 'tokenizer_config.json').write_text('{}')
  (bad / 'generation_config.json').write_text('{"eos_token_id": "x"}')
  with pytest.raises(ValueError, match='generation_config.json'):
    text_tokenizer.HFTokenizer.from_dir(str(bad))
  (bad / 'tokenizer.json').write_text('{"broken": true}')
  with pytest.raises(ValueError, match='tokenizer.json could not be read'):
    text_tokenizer.HFTokenizer.from_dir(str(bad))


# ---------------------------------------------------------------- packing


def _check_row(row, seq_len, pad_id):
  for key in ROW_FIELDS[:-1]:
    assert row[key].shape == (seq_len,), key
  assert row['loss_mask'].dtype == np.float32 and row['tokens'].dtype == np.int32
  seg, pos = row['segment_ids'], row['positions']
  used = int((seg > 0).sum())
  assert (seg[:used] > 0).all() and (seg[used:] == 0).all(), 'padding only at the end'
  assert seg[0] == 1 and (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
  assert (row['tokens'][used:] == pad_id).all() and (pos[used:] == 0).all()
  segments = []
  for s in range(1, seg.max() + 1):
    where = np.flatnonzero(seg == s)
    np.testing.assert_array_equal(pos[where], np.arange(len(where)))
    segments.append(row['tokens'][where])
  same = np.zeros(seq_len, bool)
  same[:-1] = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
  np.testing.assert_array_equal(row['loss_mask'], same.astype(np.float32))
  np.testing.assert_array_equal(row['targets'][:-1][same[:-1]], row['tokens'][1:][same[:-1]])
  assert (row['targets'][~same] == pad_id).all()
  return segments


def test_packing_keeps_every_token_once_and_short_documents_whole():
  rng = np.random.default_rng(0)
  seq_len = 16
  lengths = rng.integers(1, 3 * seq_len, size=60)
  # Token values encode (document, position), so every token is traceable.
  docs = [1000 * (i + 1) + np.arange(n) for i, n in enumerate(lengths)]
  rows = text_packing.pack_documents(docs, seq_len, pad_id=7)
  pieces = [piece for row in rows for piece in _check_row(row, seq_len, 7)]
  np.testing.assert_array_equal(np.concatenate(pieces), np.concatenate(docs))
  for piece in pieces:
    assert len(np.unique(piece // 1000)) == 1 and (np.diff(piece) == 1).all()
  for doc in docs:
    if len(doc) <= seq_len:
      assert any(np.array_equal(doc, piece) for piece in pieces), 'short document was cut'
  # Padding only where the next document would not fit: the rows are well filled.
  filled = sum(int((row['segment_ids'] > 0).sum()) for row in rows)
  assert filled == lengths.sum() and len(rows) < 1.5 * lengths.sum() / seq_len
  assert not any(row['skipped'] for row in rows)


# ---------------------------------------------------------------- corpora and pipelines

_CORPUS_HASH = ('import hashlib; from unimm_jax.data import text_corpus; '
                'print(hashlib.sha256("\\x00".join(text_corpus.builtin_documents())'
                '.encode()).hexdigest())')


@pytest.mark.e2e
def test_builtin_corpus_is_deterministic_with_disjoint_eval_split():
  docs = text_corpus.builtin_documents()
  assert len(docs) > 500 and sum(map(len, docs)) > 500_000
  digest = hashlib.sha256('\x00'.join(docs).encode()).hexdigest()
  other_process = subprocess.run([sys.executable, '-c', _CORPUS_HASH], cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout.strip()
  assert other_process == digest
  cfg = _text_config()
  train = text_corpus.make_text_source(cfg, 'train')
  held_out = text_corpus.make_text_source(cfg, 'eval')
  train_docs, eval_docs = set(train[i] for i in range(len(train))), set(held_out)
  assert len(train) + len(held_out) == len(docs) and not train_docs & eval_docs
  assert list(held_out) == list(docs[::text_corpus.HOLDOUT_STRIDE])
  assert text_corpus.HOLDOUT_STRIDE == 50 and len(held_out) == -(-len(docs) // 50)


def test_jsonl_and_text_folder_skip_and_count_bad_records(tmp_path):
  lines = [json.dumps({'text': f'document number {i}'}) for i in range(6)]
  lines[2] = '{"text": "unterminated'
  lines[4] = json.dumps({'title': 'no text field'})
  (tmp_path / 'a.jsonl').write_text('\n'.join(lines[:3]) + '\n\n')
  (tmp_path / 'b.jsonl').write_text('\n'.join(lines[3:]) + '\n')
  cfg = _text_config(source='jsonl', path=str(tmp_path / '*.jsonl'),
                     eval_path=str(tmp_path / '*.jsonl'), seq_len=32)
  validate_text_data_config(cfg)
  source = text_corpus.make_text_source(cfg, 'eval')
  records = [source[i] for i in range(len(source))]
  assert len(records) == 6 and sum(isinstance(r, Unreadable) for r in records) == 2
  assert 'a.jsonl line 3' in records[2].reason and records[3] == 'document number 3'
  tok = text_tokenizer.ByteTokenizer()
  batches = list(text_corpus.build_text_eval_batches(cfg, tok, batch_size=2))
  assert sum(int(b['skipped'].sum()) for b in batches) == 2
  packed = [t for b in batches for t in b['tokens'][b['segment_ids'] > 0]]
  assert tok.decode(packed).count('document number') == 4

  folder = tmp_path / 'texts'
  (folder / 'sub').mkdir(parents=True)
  for i in range(4):
    (folder / 'sub' / f'{i}.txt').write_text(f'text file {i}')
  (folder / 'bad.md').write_bytes(b'\xff\xfe not utf-8')
  (folder / 'ignored.bin').write_bytes(b'binary')
  cfg = _text_config(source='text_folder', path=str(folder), eval_path=str(folder))
  source = text_corpus.make_text_source(cfg, 'eval')
  assert len(source) == 5 and isinstance(source[0], Unreadable) and source[1] == 'text file 0'


def test_missing_files_fail_naming_the_field_and_kind(tmp_path):
  (tmp_path / 'only.bin').write_bytes(b'binary')
  for overrides, match in (
      ({'source': 'text_folder', 'eval_path': str(tmp_path / 'none')},
       'data_config.eval_path: text folder .* does not exist'),
      ({'source': 'text_folder', 'eval_path': str(tmp_path)},
       'data_config.eval_path: text folder .* holds no text files'),
      ({'source': 'jsonl', 'eval_path': str(tmp_path / '*.jsonl')},
       'data_config.eval_path: no JSONL file matches')):
    cfg = _text_config(path=str(tmp_path), **overrides)
    with pytest.raises(ValueError, match=match):
      text_corpus.make_text_source(cfg, 'eval')


def test_config_validation_names_the_field(tmp_path):
  for overrides, field in (({'source': 'web'}, 'source'), ({'seq_len': 1}, 'seq_len'),
                           ({'source': 'jsonl'}, 'path'), ({'path': 'x'}, 'path'),
                           ({'tokenizer': str(tmp_path / 'none')}, 'tokenizer'),
                           ({'shuffle_seed': 2**32}, 'shuffle_seed')):
    with pytest.raises(ValueError, match=f'data_config.{field}'):
      validate_text_data_config(_text_config(**overrides))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_iterator_resumes_with_identical_batches():
  cfg = _text_config(seq_len=64, shuffle_seed=3)
  tok = text_tokenizer.ByteTokenizer()
  it = text_corpus.build_text_train_iterator(cfg, tok, global_batch_size=4)
  first = _take(it, 3)
  for batch in first:
    assert set(batch) == set(ROW_FIELDS) and batch['tokens'].shape == (4, 64)
    assert batch['skipped'].shape == (4,) and batch['loss_mask'].sum() > 0
    _check_row({k: v[0] for k, v in batch.items()}, 64, tok.pad_id)
  state = json.loads(json.dumps(it.get_state()))  # what Orbax writes
  assert state['used'] > 0, 'the state should fall inside a document for this test'
  expected = _take(it, 4)
  resumed = text_corpus.build_text_train_iterator(cfg, tok, global_batch_size=4)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 4)):
    for key in ROW_FIELDS:
      np.testing.assert_array_equal(a[key], b[key])
  again = _take(text_corpus.build_text_train_iterator(cfg, tok, global_batch_size=4), 1)[0]
  np.testing.assert_array_equal(again['tokens'], first[0]['tokens'])
  other = text_corpus.build_text_train_iterator(_text_config(seq_len=64, shuffle_seed=4), tok,
                                                global_batch_size=4)
  assert not np.array_equal(next(other)['tokens'], first[0]['tokens'])


def test_eval_batches_are_fixed_shape_and_deterministic():
  cfg = _text_config(seq_len=128)
  tok = text_tokenizer.ByteTokenizer()
  batches = list(text_corpus.build_text_eval_batches(cfg, tok, batch_size=8))
  again = list(text_corpus.build_text_eval_batches(cfg, tok, batch_size=8))
  assert len(batches) == len(again) >= 2
  for a, b in zip(batches, again):
    assert a['tokens'].shape == (8, 128)
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  held_out = text_corpus.make_text_source(cfg, 'eval')
  total = sum(len(tok.encode_document(doc)) for doc in held_out)
  assert sum(int((b['segment_ids'] > 0).sum()) for b in batches) == total
  assert len(list(text_corpus.build_text_eval_batches(cfg, tok, batch_size=8,
                                                      max_batches=1))) == 1
