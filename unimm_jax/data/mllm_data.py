"""Grain pipelines of conversation records for unified MLLMs: sources, mixture, packing.

Sources (`make_conversation_sources`, one per kind, random access, records as in
`mllm_sequence`): the built-in scenes (`scene_conversations.SceneConversations`, and
`scene_edits.SceneEdits` for editing), or JSONL files with one record per line:

    {"kind": "understanding" | "generation" | "editing", "meta": {...},
     "messages": [{"role": "user", "content": [{"type": "image", "path": "a/b.png"},
                                               {"type": "text", "text": "..."}]}, ...]}

Image paths are relative to `data.image_root` (or the JSONL file's directory). The files
are scanned once to split the lines by kind; a line that is not JSON or has no valid kind
joins the first kind in the mixture, and like a malformed record or an image that fails to
decode it becomes `Unreadable`: skipped and counted in the batch's `skipped`.

Train stream (`build_mllm_train_dataset`), the same on every host:

    per kind: shuffled_shard(source, seed_k)            infinite, reshuffled every epoch
    _KindMixture(weights, seed)                         blocks of 1000 records holding each
                                                        kind in proportion, shuffled
    .map(_EncodeRecord)                                 EncodedSequence | Unreadable (with
                                                        cfg_dropout: prompts dropped at random)
    lane r of B = global batch: records r, r + B, ...   (_ProcessSlice with one row per lane)
    PackedIterDataset(MultimodalRows)                   the lane's rows, never cutting one
    _LaneBatch over this host's lanes                   rows [h b, (h + 1) b) of each batch

Packing per lane makes row r of every global batch a function of the seed and r alone,
so the hosts' batches concatenate to the one-host batch. A row (`MultimodalRows.row`; the
packed batch of the MLLM data contract adds the leading batch axis):

    tokens            int32 (L,)   ids; code and continuous slots hold pad
    positions         int32 (L,)   0, 1, ... restarting at every example; 0 on padding
    segment_ids       int32 (L,)   1, 2, ... per example; 0 on padding
    loss_mask         float32 (L,) 1 where token t + 1 is supervised in the same example
    discrete_index    int32 (L,)   -1, or j D^2 + k: code k of the row's image j
    continuous_index  int32 (L,)   -1, or j F + f: feature row f of the row's image j
    images            float32 (P, image_size, image_size, 3); unused images 0
    vit_tiles         float32 (P, 1 + max_tiles, S, S, 3) (only with anyres)
    skipped           int32 ()     records dropped while this row was filled

An example longer than L or with more than P images is dropped (logged, counted).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np

from unimm_jax.data import mllm_sequence
# Re-exported: configs build `config.data` with mllm_data.default_mllm_data_config().
from unimm_jax.data.mllm_data_config import default_mllm_data_config  # pylint: disable=unused-import
from unimm_jax.data.mllm_data_config import KIND_WEIGHT_FIELDS, validate_mllm_data_config
from unimm_jax.data.mllm_sequence import KINDS, EncodedSequence, ImageSlots, SpecialIds
from unimm_jax.data.pipeline import _ProcessSlice, host_batch_size, max_consecutive_skips
from unimm_jax.data.pipeline import prefetch_in_workers, shuffled_shard
from unimm_jax.data.sources import StrideSubset, expand_globs
from unimm_jax.data.text_packing import PackedIterDataset, padded_batches
from unimm_jax.data.transforms import Unreadable

# Every this-many-th record of each JSONL kind is held out for eval without an eval_path.
HOLDOUT_STRIDE = 50
# The mixture places each kind's share of every block of this many records, then shuffles
# the block: the ratio is exact per block, and the kinds interleave randomly.
_MIX_BLOCK = 1000
# Each lane reads (and encodes) ahead in its own thread, so a batch's rows encode in parallel.
_LANE_READ_THREADS = 1
_LANE_READ_AHEAD = 2
# Eval records encode ahead in a few threads; a small buffer bounds the memory of decoded
# images and ViT tiles (tens of MB per example at paper size).
_EVAL_READ_THREADS = 4
_EVAL_READ_AHEAD = 16


class ConversationJsonlSource:
  """The JSONL lines at `index` = [(file, byte offset, length, line number), ...].

  `source[i]` is the record with image paths joined to `image_root` (or the file's
  directory), or `Unreadable` naming the file and line.
  """

  def __init__(self, paths, index, image_root: str, name: str):
    self.paths, self.image_root, self.name = tuple(paths), image_root, name
    self._index = np.asarray(index, np.int64).reshape(-1, 4)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict | Unreadable:
    file, start, length, line = (int(v) for v in self._index[i])
    path = self.paths[file]
    where = f'{path} line {line}'
    try:
      with open(path, 'rb') as f:
        f.seek(start)
        record = json.loads(f.read(length))
    except (OSError, ValueError) as err:  # JSON and UTF-8 decode errors are ValueErrors
      return Unreadable(f'{where}: {type(err).__name__}: {err}')
    problem = mllm_sequence.record_problem(record)
    if problem:
      return Unreadable(f'{where}: {problem}')
    root = self.image_root or os.path.dirname(path)
    for message in record['messages']:
      for item in message['content']:
        if item['type'] == 'image':
          item['path'] = os.path.join(root, item['path'])
    return record

  def __repr__(self) -> str:
    return f'ConversationJsonlSource({self.name}, {len(self)} lines)'


def _scan_jsonl(paths) -> tuple[dict[str, list], list]:
  """Splits the non-blank lines of `paths` by kind: ({kind: index rows}, bad lines)."""
  by_kind, bad = {kind: [] for kind in KINDS}, []
  for file, path in enumerate(paths):
    try:
      with open(path, 'rb') as f:
        offset = 0
        for line_number, line in enumerate(f, 1):
          if line.strip():
            row = (file, offset, len(line), line_number)
            try:
              kind = json.loads(line).get('kind')
            except (ValueError, AttributeError):
              kind = None
            (by_kind[kind] if kind in by_kind else bad).append(row)
          offset += len(line)
    except OSError as err:
      raise ValueError(f'JSONL file {path!r} could not be read: {err}') from err
  return by_kind, bad


def mixture_weights(data_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Kind -> its weight in the train mixture, kinds with weight 0 left out."""
  weights = {kind: float(data_config[field]) for kind, field in KIND_WEIGHT_FIELDS.items()}
  return {kind: w for kind, w in weights.items() if w > 0}


def make_conversation_sources(data_config: ml_collections.ConfigDict, split: str,
                              kinds=KINDS) -> dict[str, Any]:
  """Kind -> random-access source of `split` ('train' or 'eval'), for each of `kinds`."""
  validate_mllm_data_config(data_config)
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if data_config.source == 'scenes':
    # Imported here: only the scenes source needs the scene renderer.
    from unimm_jax.data.scene_conversations import SceneConversations  # pylint: disable=g-import-not-at-top
    from unimm_jax.data.scene_edits import SceneEdits  # pylint: disable=g-import-not-at-top
    train = split == 'train'
    size = data_config.num_train_examples if train else data_config.num_eval_examples
    # Eval asks one question per image, so that answer accuracy counts single questions.
    turns = data_config.questions_per_image if train else 1
    return {kind: SceneEdits(split, size, data_config.image_size, data_config.scene_seed,
                             data_config.max_edits) if kind == 'editing' else
            SceneConversations(split, kind, size, data_config.image_size,
                               data_config.scene_seed, turns) for kind in kinds}
  field = 'eval_path' if split == 'eval' and data_config.eval_path else 'path'
  if not data_config[field]:
    raise ValueError("config.data.path is empty; source 'jsonl' needs the conversations' "
                     "JSONL files")
  paths = expand_globs(data_config[field], 'jsonl', 'JSONL', field)
  by_kind, bad = _scan_jsonl(paths)
  first = next(iter(mixture_weights(data_config)))
  by_kind[first] += bad  # counted as unreadable where the stream surely reads
  sources = {}
  for kind in kinds:
    source = ConversationJsonlSource(paths, sorted(by_kind[kind]), data_config.image_root,
                                     f'{data_config[field]} {kind}')
    if field == 'path':
      source = StrideSubset(source, held_out=split == 'eval', stride=HOLDOUT_STRIDE)
    sources[kind] = source
  return sources


class _EncodeRecord:
  """record | Unreadable -> EncodedSequence | Unreadable (`mllm_sequence`); picklable."""

  def __init__(self, tokenizer, ids: SpecialIds, slots: ImageSlots, template: str):
    self.tokenizer, self.ids, self.slots, self.template = tokenizer, ids, slots, template

  def __call__(self, record):
    if isinstance(record, Unreadable):
      return record
    return mllm_sequence.encode_conversation(record, self.tokenizer, self.ids, self.slots,
                                             template=self.template)


class _EncodeDroppingConditions(_EncodeRecord):
  """`_EncodeRecord` that also drops conditions for classifier-free guidance, each with
  probability `p` from the element's own rng (grain's random_map: a function of the seed
  and the stream position, so resuming replays it): a text-to-image record becomes the
  unconditional sequence ([BOI] and its image, `mllm_sequence.unconditional_sequence`, what
  the unconditional stream reads at sampling), and each instruction of an editing record is
  emptied on its own (the text-unconditional stream: the images kept, the round's
  instruction ''). Other records pass unchanged."""

  def __init__(self, tokenizer, ids: SpecialIds, slots: ImageSlots, template: str, p: float):
    super().__init__(tokenizer, ids, slots, template)
    self.p = p

  def __call__(self, record, rng: np.random.Generator):
    if isinstance(record, Unreadable):
      return record
    if record['kind'] == 'editing':
      record = {**record, 'messages': [_without_text(m) if m['role'] == 'user' and
                                       rng.random() < self.p else m
                                       for m in record['messages']]}
    seq = super().__call__(record)
    if (record['kind'] == 'generation' and not isinstance(seq, Unreadable)
        and rng.random() < self.p):
      return mllm_sequence.unconditional_sequence(seq, self.ids) or seq
    return seq


def _without_text(message: dict) -> dict:
  """The message with every text item emptied (its images kept)."""
  return {**message, 'content': [{**item, 'text': ''} if item['type'] == 'text' else item
                                 for item in message['content']]}


class _KindMixture(grain.MapDataset):
  """An infinite stream mixing `parents` (infinite MapDatasets) by `weights`.

  Block b of `_MIX_BLOCK` positions holds counts[k] records of parent k (largest-remainder
  rounding of the weights), in an order drawn from (seed, b); parent k's records enter in
  their own order, block after block, so every position maps to one record arithmetically.
  """

  def __init__(self, parents, weights, seed: int):
    super().__init__(list(parents))
    shares = np.asarray(weights, np.float64) / np.sum(weights) * _MIX_BLOCK
    counts = np.floor(shares).astype(np.int64)
    counts[np.argsort(counts - shares)[:_MIX_BLOCK - counts.sum()]] += 1
    if np.any(counts == 0):
      raise ValueError(f'mixture weights {list(weights)}: a kind gets under 1/{_MIX_BLOCK} '
                       'of the stream; set its weight to 0 or raise it')
    self._counts = counts
    self._labels = np.repeat(np.arange(len(counts)), counts)
    self._seed = seed

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    block, offset = divmod(index, _MIX_BLOCK)
    order = np.random.default_rng([self._seed, block]).permutation(self._labels)
    kind = order[offset]
    rank = int(np.count_nonzero(order[:offset] == kind))
    return self._parents[kind][block * int(self._counts[kind]) + rank]

  def __str__(self) -> str:
    return f'_KindMixture(counts per {_MIX_BLOCK}={self._counts.tolist()})'


class MultimodalRows:
  """`text_packing.RowLayout` of `EncodedSequence`s: never cut; rows as the module docstring."""

  cuttable = False

  def __init__(self, seq_len: int, images_per_row: int, slots: ImageSlots, pad_id: int):
    self.seq_len, self.max_images = seq_len, images_per_row
    self.slots, self.pad_id = slots, pad_id

  def length(self, seq: EncodedSequence) -> int:
    return len(seq)

  def num_images(self, seq: EncodedSequence) -> int:
    return seq.num_images

  def problem(self, seq: EncodedSequence) -> str | None:
    if len(seq) > self.seq_len:
      return f'an example of {len(seq)} tokens is longer than seq_len {self.seq_len}'
    if seq.num_images > self.max_images:
      return (f'an example with {seq.num_images} images has more than images_per_row '
              f'{self.max_images}')
    return None

  def row(self, segments: list, skipped: int) -> dict[str, np.ndarray]:
    length, slots = self.seq_len, self.slots
    side = slots.image_size
    row = {'tokens': np.full(length, self.pad_id, np.int32),
           'positions': np.zeros(length, np.int32),
           'segment_ids': np.zeros(length, np.int32),
           'loss_mask': np.zeros(length, np.float32),
           'discrete_index': np.full(length, -1, np.int32),
           'continuous_index': np.full(length, -1, np.int32),
           'images': np.zeros((self.max_images, side, side, 3), np.float32)}
    if slots.anyres is not None:
      s = slots.anyres.tile_size
      row['vit_tiles'] = np.zeros((self.max_images, 1 + slots.anyres.max_tiles, s, s, 3),
                                  np.float32)
    start = image = 0
    for segment_id, seq in enumerate(segments, 1):
      end, m = start + len(seq), seq.num_images
      row['tokens'][start:end] = seq.tokens
      row['positions'][start:end] = np.arange(len(seq))
      row['segment_ids'][start:end] = segment_id
      row['loss_mask'][start:end - 1] = seq.supervised[1:]
      # Slots count images from 0 within the example; in the row they follow earlier ones.
      row['discrete_index'][start:end] = np.where(
          seq.discrete_slot >= 0, seq.discrete_slot + image * slots.codes_per_image, -1)
      row['continuous_index'][start:end] = np.where(
          seq.continuous_slot >= 0, seq.continuous_slot + image * slots.features_per_image, -1)
      row['images'][image:image + m] = seq.images
      if slots.anyres is not None:
        row['vit_tiles'][image:image + m] = seq.vit_tiles
      start, image = end, image + m
    row['skipped'] = np.int32(skipped)
    return row


class _LaneBatchIterator(grain.DatasetIterator):
  """Stacks one row of every lane; the state is the lanes' states."""

  def __init__(self, lanes: list):
    super().__init__(lanes)
    self._lanes = lanes

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [next(lane) for lane in self._lanes]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

  def get_state(self) -> dict[str, Any]:
    return {'lanes': [lane.get_state() for lane in self._lanes]}

  def set_state(self, state: dict[str, Any]) -> None:
    for lane, lane_state in zip(self._lanes, state['lanes'], strict=True):
      lane.set_state(lane_state)


class _LaneBatch(grain.IterDataset):
  """Batches of one row from each parent (lane), in parent order."""

  def __iter__(self) -> _LaneBatchIterator:
    return _LaneBatchIterator([parent.__iter__() for parent in self.parents])

  def __str__(self) -> str:
    return f'_LaneBatch({len(self.parents)} lanes)'


def build_mllm_train_dataset(data_config: ml_collections.ConfigDict, tokenizer,
                             ids: SpecialIds, slots: ImageSlots, *, batch_size: int,
                             shard_index: int = 0, shard_count: int = 1,
                             sources: dict[str, Any] | None = None) -> grain.IterDataset:
  """The infinite, shuffled, mixed, packed train batches of one shard (host).

  Returns a grain IterDataset of the module docstring's rows with a leading `batch_size`
  axis: rows [shard_index * batch_size, (shard_index + 1) * batch_size) of every global
  batch of `batch_size * shard_count` rows. `sources` (kind -> random-access source of
  records) replaces the config's sources; its kinds must be those of positive weight.
  """
  validate_mllm_data_config(data_config)
  if batch_size <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f'batch_size must be >= 1 and 0 <= shard_index < shard_count, got '
                     f'{batch_size}, {shard_index}, {shard_count}')
  weights = mixture_weights(data_config)
  if sources is None:
    sources = make_conversation_sources(data_config, 'train', tuple(weights))
  elif set(sources) != set(weights):
    raise ValueError(f'sources has kinds {sorted(sources)}, the weights of data_config give '
                     f'{sorted(weights)}')
  sources = {kind: sources[kind] for kind in weights}
  # The mixture's, each kind's shuffle's and the condition dropout's (last: the others stay
  # those of runs before it).
  seeds = np.random.SeedSequence(data_config.shuffle_seed).generate_state(2 + len(sources))
  parents = [shuffled_shard(source, seed=int(seed), unit='records')
             for source, seed in zip(sources.values(), seeds[1:-1])]
  stream = _KindMixture(parents, list(weights.values()), int(seeds[0]))
  dropout = data_config.get('cfg_dropout', 0.0)  # configs saved before the field: none
  if dropout > 0:
    stream = stream.random_map(_EncodeDroppingConditions(
        tokenizer, ids, slots, data_config.chat_template, dropout), seed=int(seeds[-1]))
  else:
    stream = stream.map(_EncodeRecord(tokenizer, ids, slots, data_config.chat_template))
  layout = MultimodalRows(data_config.seq_len, data_config.images_per_row, slots, ids.pad)
  limit = max_consecutive_skips(range(sum(len(s) for s in sources.values())))  # by length
  global_batch = batch_size * shard_count
  lanes = []
  for lane in range(shard_index * batch_size, (shard_index + 1) * batch_size):
    records = _ProcessSlice(stream, global_batch=global_batch, index=lane, count=global_batch)
    records = records.to_iter_dataset(grain.ReadOptions(
        num_threads=_LANE_READ_THREADS, prefetch_buffer_size=_LANE_READ_AHEAD))
    lanes.append(PackedIterDataset(records, layout, limit))
  return prefetch_in_workers(_LaneBatch(lanes), data_config)


def build_mllm_train_iterator(data_config: ml_collections.ConfigDict, tokenizer,
                              ids: SpecialIds, slots: ImageSlots, *,
                              global_batch_size: int) -> grain.DatasetIterator:
  """This host's infinite train iterator, checkpointable (`get_state` / `set_state`, or
  grain.checkpoint in Orbax): `global_batch_size // jax.process_count()` rows per batch."""
  return iter(build_mllm_train_dataset(
      data_config, tokenizer, ids, slots, batch_size=host_batch_size(global_batch_size),
      shard_index=jax.process_index(), shard_count=jax.process_count()))


def _eval_stream(data_config: ml_collections.ConfigDict) -> tuple[list, dict]:
  """([(kind, index), ...], sources): the eval records of the mixture's kinds interleaved
  (kind 0 record 0, kind 1 record 0, then record 1 of each, ...) until all are used."""
  sources = make_conversation_sources(data_config, 'eval', tuple(mixture_weights(data_config)))
  order = itertools.zip_longest(*[range(len(s)) for s in sources.values()])
  return [(kind, i) for row in order for kind, i in zip(sources, row) if i is not None], sources


def build_mllm_eval_batches(data_config: ml_collections.ConfigDict, tokenizer,
                            ids: SpecialIds, slots: ImageSlots, *, batch_size: int,
                            max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The eval split packed in order (`_eval_stream`), `batch_size` rows per batch, one pass.

  Every host yields the same batches; the last is filled up with empty rows (segment_ids
  and loss_mask 0), so every batch has the train batch's shapes. Stops after
  `max_batches` batches when given.
  """
  if batch_size <= 0 or (max_batches is not None and max_batches <= 0):
    raise ValueError(f'batch_size and max_batches must be >= 1, got {batch_size}, '
                     f'{max_batches}')
  order, sources = _eval_stream(data_config)
  records = grain.MapDataset.source(order).map(lambda ki: sources[ki[0]][ki[1]])
  records = records.map(_EncodeRecord(tokenizer, ids, slots, data_config.chat_template)).to_iter_dataset(
      grain.ReadOptions(num_threads=_EVAL_READ_THREADS, prefetch_buffer_size=_EVAL_READ_AHEAD))
  layout = MultimodalRows(data_config.seq_len, data_config.images_per_row, slots, ids.pad)
  rows = PackedIterDataset(records, layout, len(order) + 1).batch(batch_size)
  empty = layout.row([], 0)

  return padded_batches(rows, empty, batch_size, max_batches,
                        'the MLLM eval split holds no readable record that fits a row')


def eval_records(data_config: ml_collections.ConfigDict, kind: str, count: int) -> list[dict]:
  """The first `count` readable records of `kind` in the eval split (with their meta:
  answers, generation and edit checks); [] for count 0."""
  if count <= 0:
    return []
  source = make_conversation_sources(data_config, 'eval', (kind,))[kind]
  records = []
  for i in range(len(source)):
    record = source[i]
    if not isinstance(record, Unreadable):
      records.append(record)
      if len(records) == count:
        return records
  raise ValueError(f'the eval split has {len(records)} readable {kind} records, fewer than '
                   f'the {count} asked for (data_config.num_eval_examples for scenes)')


def prompt_text(record: dict) -> str:
  """The text of the record's last user turn (its text items joined by spaces)."""
  users = [m for m in record['messages'] if m['role'] == 'user']
  if not users:
    raise ValueError('the record has no user turn')
  return ' '.join(item['text'] for item in users[-1]['content'] if item['type'] == 'text')
