"""Text documents for LM training, and the Grain pipelines that pack them into rows.

Sources (`make_text_source(data_config, split)`); a record is a document's text or an
`Unreadable` marker, never an exception:

- `builtin`: `builtin_documents()`, text that ships with every CPython, so it is there
  offline: the help topics of the language reference (`pydoc_data.topics`, 79 documents),
  then the docstrings in the source files of `_STDLIB_MODULES` (one document per module,
  per public function, and per public class with its methods' docstrings). 1,104
  documents, 1.36 MB on CPython 3.11.7; the same for a given Python install, whatever the
  process imported before (other Python versions give other text).
- `jsonl`: `path` is a glob, comma-separated globs, or a list; every non-blank line is one
  JSON object whose `text_key` field is the document. A line that is not valid JSON or has
  no string in that field is an `Unreadable` record.
- `text_folder`: every file with a `TEXT_EXTENSIONS` extension under the directory `path`
  (recursive, hidden entries ignored, sorted) is one document; a file that cannot be read
  or is not UTF-8 is `Unreadable`.

Split: `eval_path` (format of `path`) names the eval documents; when it is empty (always
for builtin) documents `0, 50, 100, ...` (`HOLDOUT_STRIDE`) are held out for eval and never
trained on (`sources.StrideSubset`); for the builtin corpus that is 23 documents.

Rows: each document becomes `tokenizer.encode_document(text)` and the documents are packed
into rows of `seq_len` tokens (`text_packing`, which also documents the row fields and the
loss convention); padding is the tokenizer's pad id, or 0 when it has none.

Train pipeline, per host (`build_text_train_dataset`):

    source (make_text_source)[shard_index::shard_count]     str | Unreadable
    [.repeat(k)] .shuffle(shuffle_seed).repeat()            reshuffled every epoch
    .map(tokenize) .to_iter_dataset(ReadOptions)            int32 (n,) | Unreadable
    text_packing.PackedRowIterDataset(seq_len)              rows, int32 / float32 (L,)
    .batch(host_batch) [.mp_prefetch(num_workers)]          every field gains a batch axis
"""

from __future__ import annotations

import ast
import functools
import gc
import json
import os
import sysconfig
from typing import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from unimm_jax.data.pipeline import (host_batch_size, max_consecutive_skips,
                                     prefetch_in_workers, shuffled_shard)
from unimm_jax.data.sources import StrideSubset, expand_globs, list_files
from unimm_jax.data.text_data_config import validate_text_data_config
from unimm_jax.data.text_packing import PackedRowIterDataset, packed_row, padded_batches
from unimm_jax.data.text_tokenizer import TextTokenizer
from unimm_jax.data.transforms import Unreadable

TEXT_EXTENSIONS = ('.txt', '.md', '.rst', '.text')

# One document in this many is held out for eval when no eval_path is given. Denser than the
# image stride (sources.HOLDOUT_STRIDE) because a corpus has far fewer documents than a
# dataset has images: the builtin one gets 23 eval documents instead of 12.
HOLDOUT_STRIDE = 50

# Pure-Python standard-library modules whose docstrings form the builtin corpus, in order.
_STDLIB_MODULES = (
    'argparse', 'ast', 'asyncio.base_events', 'asyncio.events', 'asyncio.locks',
    'asyncio.queues', 'asyncio.streams', 'asyncio.tasks', 'base64', 'bdb', 'bisect', 'bz2',
    'calendar', 'cmd', 'code', 'codecs', 'collections', 'colorsys', 'compileall',
    'configparser', 'contextlib', 'contextvars', 'copy', 'copyreg', 'csv', 'dataclasses',
    'datetime', 'difflib', 'dis', 'doctest', 'email.headerregistry', 'email.message',
    'email.policy', 'email.utils', 'enum', 'filecmp', 'fileinput', 'fnmatch', 'fractions',
    'ftplib', 'functools', 'getopt', 'gettext', 'glob', 'graphlib', 'gzip', 'hashlib',
    'heapq', 'hmac', 'html.parser', 'http.client', 'http.cookiejar', 'http.cookies',
    'http.server', 'imaplib', 'importlib.abc', 'importlib.metadata', 'importlib.resources',
    'inspect', 'io', 'ipaddress', 'json', 'json.decoder', 'json.encoder', 'keyword',
    'linecache', 'locale', 'logging', 'logging.handlers', 'lzma', 'mailbox', 'mimetypes',
    'modulefinder', 'multiprocessing.managers', 'multiprocessing.pool', 'netrc', 'numbers',
    'operator', 'optparse', 'os', 'pathlib', 'pdb', 'pickle', 'pkgutil', 'platform',
    'plistlib', 'poplib', 'pprint', 'py_compile', 'pydoc', 'queue', 'quopri', 'random', 're',
    'reprlib', 'runpy', 'sched', 'secrets', 'selectors', 'shelve', 'shlex', 'shutil',
    'signal', 'smtplib', 'socket', 'socketserver', 'sqlite3', 'ssl', 'stat', 'statistics',
    'string', 'struct', 'subprocess', 'symtable', 'sysconfig', 'tabnanny', 'tarfile',
    'tempfile', 'textwrap', 'threading', 'timeit', 'tkinter', 'tokenize', 'trace',
    'traceback', 'tracemalloc', 'turtle', 'types', 'typing', 'unittest.case', 'unittest.mock',
    'urllib.parse', 'urllib.request', 'urllib.robotparser', 'uuid', 'warnings', 'wave',
    'weakref', 'wsgiref.simple_server', 'xml.dom.minidom', 'xml.etree.ElementTree',
    'xmlrpc.client', 'zipfile', 'zipimport', 'zoneinfo',
)

# Shorter builtin documents are one-line docstrings ("Return the sum."), too little text.
_MIN_BUILTIN_CHARS = 100

# Threads that read and tokenize documents ahead inside each process, and how many.
_READ_THREADS = 4
_READ_AHEAD_DOCUMENTS = 64


def _stdlib_source_documents(name: str, stdlib_dir: str) -> list[str]:
  """Docstrings in the source file of stdlib module `name`: the module's, then one document
  per public top-level function and per public class (with its public methods' docstrings).

  Read with `ast`, never imported: live modules can be patched by whatever else the process
  imported (pytest replaces sys.unraisablehook, transformers adds Logger.warning_once), and
  the corpus must not depend on that. A module whose source file is absent gives nothing.
  """
  base = os.path.join(stdlib_dir, *name.split('.'))
  for path in (base + '.py', os.path.join(base, '__init__.py')):
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
      break
  else:
    return []
  documents = [f'{name}\n\n{ast.get_docstring(tree) or ""}']
  definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
  for node in tree.body:
    if not isinstance(node, definitions) or node.name.startswith('_'):
      continue
    parts = [f'{name}.{node.name}', ast.get_docstring(node) or '']
    if isinstance(node, ast.ClassDef):
      parts += [f'{node.name}.{member.name}: {ast.get_docstring(member)}'
                for member in node.body
                if isinstance(member, definitions[:2]) and not member.name.startswith('_')
                and ast.get_docstring(member)]
    documents.append('\n\n'.join(part for part in parts if part))
  return documents


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
  """The builtin corpus (module docstring): help topics, then stdlib docstrings, in order."""
  try:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  except ImportError:  # some distributions strip the help topics
    topics = {}
  documents = [topics[key].strip() for key in sorted(topics)]
  stdlib_dir = sysconfig.get_paths()['stdlib']
  # Parsing allocates millions of AST nodes, which sets off cyclic collections that walk the
  # whole heap (large once jax is imported) and would triple the time; reference counting
  # frees the trees anyway.
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for name in _STDLIB_MODULES:
      documents.extend(_stdlib_source_documents(name, stdlib_dir))
  finally:
    if gc_was_enabled:
      gc.enable()
  return tuple(d for d in dict.fromkeys(documents) if len(d) >= _MIN_BUILTIN_CHARS)


class DocumentListSource:
  """Documents held in memory (the builtin corpus)."""

  def __init__(self, documents: Sequence[str], name: str):
    self.documents = tuple(documents)
    self.name = name

  def __len__(self) -> int:
    return len(self.documents)

  def __getitem__(self, index: int) -> str:
    return self.documents[index]

  def __repr__(self) -> str:
    return f'DocumentListSource({self.name}, {len(self)} documents)'


class JsonlSource:
  """The non-blank lines of JSONL files; each is read with a seek when it is needed.

  The line index (file, byte offset, length, line number) is built once by scanning the
  files; it is what travels to grain workers, about 20 bytes per line.
  """

  def __init__(self, paths: Sequence[str], text_key: str):
    self.paths = tuple(paths)
    self.text_key = text_key
    files, starts, lengths, line_numbers = [], [], [], []
    for file_index, path in enumerate(self.paths):
      try:
        with open(path, 'rb') as f:
          offset = 0
          for line_number, line in enumerate(f, 1):
            if line.strip():
              files.append(file_index)
              starts.append(offset)
              lengths.append(len(line))
              line_numbers.append(line_number)
            offset += len(line)
      except OSError as err:
        raise ValueError(f'JSONL file {path!r} could not be read: {err}') from err
    self._files = np.asarray(files, np.int32)
    self._starts = np.asarray(starts, np.int64)
    self._lengths = np.asarray(lengths, np.int32)
    self._line_numbers = np.asarray(line_numbers, np.int32)

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> str | Unreadable:
    path = self.paths[self._files[index]]
    where = f'{path} line {self._line_numbers[index]}'
    try:
      with open(path, 'rb') as f:
        f.seek(int(self._starts[index]))
        record = json.loads(f.read(int(self._lengths[index])))
    # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    except (OSError, ValueError) as err:
      return Unreadable(f'{where}: {type(err).__name__}: {err}')
    text = record.get(self.text_key) if isinstance(record, dict) else None
    if not isinstance(text, str):
      return Unreadable(f'{where}: not a JSON object with a string {self.text_key!r} field')
    return text

  def __repr__(self) -> str:
    more = f' and {len(self.paths) - 1} more' if len(self.paths) > 1 else ''
    return f'JsonlSource({self.paths[0]!r}{more}, {len(self)} lines)'


class TextFileSource:
  """One document per UTF-8 text file; paths are kept relative to `root`."""

  def __init__(self, root: str, relative_paths: Sequence[str]):
    self.root = root
    self.relative_paths = tuple(relative_paths)

  def __len__(self) -> int:
    return len(self.relative_paths)

  def __getitem__(self, index: int) -> str | Unreadable:
    path = os.path.join(self.root, self.relative_paths[index])
    try:
      with open(path, encoding='utf-8') as f:
        return f.read()
    except (OSError, UnicodeDecodeError) as err:
      return Unreadable(f'{path}: {type(err).__name__}: {err}')

  def __repr__(self) -> str:
    return f'TextFileSource({self.root!r}, {len(self)} files)'


def make_text_source(data_config: ml_collections.ConfigDict, split: str):
  """The train (`split='train'`) or eval (`split='eval'`) documents of `data_config`.

  Returns a random-access source: `len(source)`, `source[i] -> str | Unreadable`.
  `data_config` is assumed valid (`validate_text_data_config`).
  """
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  train = split == 'train'
  if data_config.source == 'builtin':
    source = DocumentListSource(builtin_documents(), 'builtin')
  else:
    field = 'eval_path' if data_config.eval_path and not train else 'path'
    location = data_config[field]
    if data_config.source == 'jsonl':
      source = JsonlSource(expand_globs(location, 'jsonl', 'JSONL', field),
                           data_config.text_key)
    else:
      source = TextFileSource(location, list_files(location, TEXT_EXTENSIONS, 'text', field))
    if data_config.eval_path:
      if len(source) == 0:
        raise ValueError(f'data_config.{field}: {source!r} holds no documents')
      return source
  if len(source) < 2:
    raise ValueError(f'{source!r} has {len(source)} document(s); holding out an eval set '
                     'needs at least 2 (or set data_config.eval_path)')
  return StrideSubset(source, held_out=not train, stride=HOLDOUT_STRIDE)


class _TokenizeDocument:
  """`str -> int32 (n,)` with `tokenizer.encode_document`; `Unreadable` passes through."""

  def __init__(self, tokenizer: TextTokenizer):
    self.tokenizer = tokenizer

  def __call__(self, record: str | Unreadable) -> np.ndarray | Unreadable:
    if isinstance(record, Unreadable):
      return record
    return np.asarray(self.tokenizer.encode_document(record), np.int32)


def _tokenized(ds: grain.MapDataset, tokenizer: TextTokenizer) -> grain.IterDataset:
  """`ds` (`str | Unreadable` records) as `int32 (n,) | Unreadable`, read ahead by threads."""
  return ds.map(_TokenizeDocument(tokenizer)).to_iter_dataset(
      grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_AHEAD_DOCUMENTS))


def _pad_id(tokenizer: TextTokenizer) -> int:
  return 0 if tokenizer.pad_id is None else tokenizer.pad_id


def build_text_train_dataset(data_config: ml_collections.ConfigDict,
                             tokenizer: TextTokenizer, *, batch_size: int,
                             seq_len: int | None = None, shard_index: int = 0,
                             shard_count: int = 1) -> grain.IterDataset:
  """The infinite, shuffled, packed, batched train dataset of one shard (host).

  Args:
    data_config: the text `data` config (fields in `text_data_config.py`).
    tokenizer: turns documents into ids (`text_tokenizer.load_tokenizer`).
    batch_size: rows per batch of this shard.
    seq_len: tokens per row; None uses `data_config.seq_len`.
    shard_index: this shard, in [0, shard_count); it reads documents
      `shard_index::shard_count` of the train split.
    shard_count: number of shards (hosts).

  Returns:
    A grain IterDataset of batches: the row fields of `text_packing` with a leading
    `batch_size` axis (`tokens` (b, L) int32, ..., `skipped` (b,) int32).
  """
  validate_text_data_config(data_config)
  seq_len = data_config.seq_len if seq_len is None else seq_len
  if batch_size <= 0 or seq_len < 2:
    raise ValueError(f'batch_size must be >= 1 and seq_len >= 2, got {batch_size}, {seq_len}')
  source = make_text_source(data_config, 'train')
  ds = shuffled_shard(source, seed=data_config.shuffle_seed, shard_index=shard_index,
                      shard_count=shard_count, unit='documents')
  it = PackedRowIterDataset(_tokenized(ds, tokenizer), seq_len, _pad_id(tokenizer),
                            max_consecutive_skips(source))
  return prefetch_in_workers(it.batch(batch_size, drop_remainder=True), data_config)


def build_text_train_iterator(data_config: ml_collections.ConfigDict,
                              tokenizer: TextTokenizer, *, global_batch_size: int,
                              seq_len: int | None = None) -> grain.DatasetIterator:
  """This host's infinite train iterator of packed batches, checkpointable with grain / Orbax.

  The host reads shard `jax.process_index()` of `jax.process_count()` and yields
  `global_batch_size // jax.process_count()` rows per batch (`build_text_train_dataset`).
  The document order follows `data_config.shuffle_seed`. Save and restore it with
  `get_state()` / `set_state(state)` or `grain.checkpoint.CheckpointSave/Restore` in Orbax.
  """
  ds = build_text_train_dataset(data_config, tokenizer,
                                batch_size=host_batch_size(global_batch_size),
                                seq_len=seq_len, shard_index=jax.process_index(),
                                shard_count=jax.process_count())
  return iter(ds)


def build_text_eval_batches(data_config: ml_collections.ConfigDict,
                            tokenizer: TextTokenizer, *, batch_size: int,
                            seq_len: int | None = None,
                            max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The eval split, packed in order, as batches of `batch_size` rows (one pass, finite).

  Every host yields the same batches. Rows are packed as in training, without shuffling;
  the last batch is filled up with empty rows (segment_ids and loss_mask all 0), so every
  batch has the train batch's shapes. Stops after `max_batches` batches when given.
  """
  validate_text_data_config(data_config)
  seq_len = data_config.seq_len if seq_len is None else seq_len
  if batch_size <= 0 or seq_len < 2 or (max_batches is not None and max_batches <= 0):
    raise ValueError(f'batch_size and max_batches must be >= 1 and seq_len >= 2, got '
                     f'{batch_size}, {max_batches}, {seq_len}')
  source = make_text_source(data_config, 'eval')
  pad_id = _pad_id(tokenizer)
  # A finite pass ends by itself, so the consecutive-skips limit can never be reached.
  rows = PackedRowIterDataset(_tokenized(grain.MapDataset.source(source), tokenizer), seq_len,
                              pad_id, len(source) + 1).batch(batch_size)
  empty = packed_row([], seq_len, pad_id, 0)

  return padded_batches(rows, empty, batch_size, max_batches,
                        f'the eval split {source!r} holds no readable document')
