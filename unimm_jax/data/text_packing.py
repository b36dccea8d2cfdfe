"""Packing of tokenized documents into fixed-length rows, as a resumable Grain IterDataset.

A document is `int32 (n,)` token ids (`TextTokenizer.encode_document`: bos if the
tokenizer wants it, the text, eos) and rows of `L = seq_len` tokens are filled greedily in
stream order: a document that fits in the room left goes in whole; one longer than L is cut
into pieces, the first filling the room left and the rest continuing in the next rows; one
that would fit an empty row but not the room left closes the row (padding) and starts the
next. Each document or piece in a row is a segment:

    tokens       int32 (L,)    token ids; padding holds pad_id
    segment_ids  int32 (L,)    1, 2, 3, ... per segment in the row; 0 on padding
    positions    int32 (L,)    0, 1, 2, ... restarting at every segment; 0 on padding
    targets      int32 (L,)    tokens[t + 1] when t + 1 is in the same segment, else pad
    loss_mask    float32 (L,)  1 where targets[t] is a real target: 0 on the last token of
                               every segment and on padding
    skipped      int32 ()      unreadable records dropped while this row was filled

Convention: the model at position t attends causally within its segment (equal, non-zero
segment_ids) and predicts targets[t]; the loss is `sum(loss_mask * ce) / sum(loss_mask)`.
Across a cut the last token of a piece does not predict the first of the next piece.

Packing streams inside the pipeline rather than packing the corpus once up front, because
a user corpus need not fit in memory or be tokenized before step one, and each epoch packs
freshly shuffled documents. Resume stays exact: the packer's state is the parent's state
just before the document in progress plus how many of its tokens earlier rows took, and
everything upstream is a deterministic function of the seed and the stream position.

The packer itself knows nothing of tokens: a `RowLayout` says how long an element is, how
many images it holds, whether it may be cut, why it can never be packed, and how segments
become a row. `TextRows` is the layout above; multimodal examples (`mllm_data.MultimodalRows`)
are never cut, an example longer than L or with more images than a row holds is dropped and
counted in `skipped`, and a row closes when the next example's tokens or images do not fit.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol, Sequence

from absl import logging
import grain
import numpy as np

from unimm_jax.data.transforms import Unreadable


def packed_row(segments: Sequence[np.ndarray], seq_len: int, pad_id: int,
               skipped: int) -> dict[str, np.ndarray]:
  """The row dict (module docstring) of `segments`, whose lengths sum to <= seq_len.

  With no segments it is an empty row: all padding, segment_ids and loss_mask all 0.
  """
  tokens = np.full(seq_len, pad_id, np.int32)
  segment_ids = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  start = 0
  for segment_id, segment in enumerate(segments, 1):
    end = start + len(segment)
    tokens[start:end] = segment
    segment_ids[start:end] = segment_id
    positions[start:end] = np.arange(len(segment))
    start = end
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[:-1] = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] > 0)
  targets = np.full(seq_len, pad_id, np.int32)
  targets[:-1] = np.where(loss_mask[:-1] > 0, tokens[1:], pad_id)
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions,
          'targets': targets, 'loss_mask': loss_mask, 'skipped': np.int32(skipped)}


class RowLayout(Protocol):
  """What the packer needs to know about its elements and rows (module docstring)."""

  seq_len: int     # L, tokens per row
  max_images: int  # images a row holds (0 where elements hold none)
  cuttable: bool   # whether an element may be split across rows (text) or never (examples)

  def length(self, element) -> int:
    """Tokens of `element`."""

  def num_images(self, element) -> int:
    """Images of `element`."""

  def problem(self, element) -> str | None:
    """Why `element` can never be packed (dropped and counted), or None."""

  def piece(self, element, start: int, stop: int):
    """Tokens [start, stop) of `element` as a segment (cuttable layouts only)."""

  def row(self, segments: list, skipped: int) -> dict[str, np.ndarray]:
    """The row of `segments` (their lengths sum to <= L) with `skipped` records dropped."""


class TextRows:
  """`RowLayout` of `int32 (n,)` documents, cut where they overflow: rows of `packed_row`."""

  cuttable = True
  max_images = 0

  def __init__(self, seq_len: int, pad_id: int):
    self.seq_len = seq_len
    self.pad_id = pad_id

  def length(self, element: np.ndarray) -> int:
    return len(element)

  def num_images(self, element: np.ndarray) -> int:
    return 0

  def problem(self, element: np.ndarray) -> str | None:
    return None

  def piece(self, element: np.ndarray, start: int, stop: int) -> np.ndarray:
    return element[start:stop]

  def row(self, segments: list, skipped: int) -> dict[str, np.ndarray]:
    return packed_row(segments, self.seq_len, self.pad_id, skipped)


class _PackedRowIterator(grain.DatasetIterator):
  """Packs the parent's elements into rows of `layout`; drops and counts `Unreadable`
  records and elements with a `layout.problem`.

  State: `{'parent': parent state right before the element in progress, 'used': how many
  of its tokens earlier rows took}`, or the parent's current state and 0 between elements.
  An element that closed a row without entering it is in progress with 0 tokens used.
  """

  def __init__(self, parent: grain.DatasetIterator, layout: RowLayout, max_consecutive: int):
    super().__init__(parent)
    self._layout = layout
    self._max_consecutive = max_consecutive
    self._document = None  # the element in progress, or None
    self._document_state = None
    self._used = 0
    self._used_on_restore = 0
    self._skipped_total = 0

  def _problem(self, record) -> str | None:
    """Why `record` is dropped: its reason (counted in `skipped`), '' when it is empty (not
    counted), None when it is packed."""
    if isinstance(record, Unreadable):
      return record.reason
    problem = self._layout.problem(record)
    if problem is None and self._layout.length(record) == 0:
      return ''
    return problem

  def __next__(self) -> dict[str, np.ndarray]:
    layout = self._layout
    segments, room, images, skipped, consecutive = [], layout.seq_len, 0, 0, 0
    while room:
      if self._document is None:
        state = self._parent.get_state()
        try:
          record = next(self._parent)
        except StopIteration:
          if segments or skipped:  # a finite stream: its last row is padded
            break
          raise
        problem = self._problem(record)
        if problem is not None:
          consecutive += 1
          if consecutive >= self._max_consecutive:
            raise RuntimeError(f'{consecutive} unreadable, unpackable or empty records in a '
                               f'row; the data looks broken. Last: {problem or "empty"}')
          if problem:
            skipped += 1
            self._skipped_total += 1
            logging.log_every_n(logging.WARNING, 'Skipping a record (%d so far in this '
                                'process): %s', 100, self._skipped_total, problem)
          continue
        self._document, self._document_state = record, state
        self._used, self._used_on_restore = self._used_on_restore, 0
      rest = layout.length(self._document) - self._used
      new_images = layout.num_images(self._document) if self._used == 0 else 0
      if segments and (room < rest <= layout.seq_len or images + new_images > layout.max_images):
        break  # it fits an empty row whole (or its images do not fit here): next row
      take = min(rest, room)
      if layout.cuttable:
        segments.append(layout.piece(self._document, self._used, self._used + take))
      else:
        segments.append(self._document)  # never cut: problem() dropped any longer than L
      self._used += take
      room -= take
      images += new_images
      consecutive = 0
      if self._used == layout.length(self._document):
        self._document = None
    return layout.row(segments, skipped)

  def get_state(self) -> dict[str, Any]:
    if self._document is not None:
      return {'parent': self._document_state, 'used': self._used}
    return {'parent': self._parent.get_state(), 'used': self._used_on_restore}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._document = None
    self._used_on_restore = int(state['used'])


class PackedIterDataset(grain.IterDataset):
  """Rows of `layout` packed from the parent's elements (module docstring).

  The parent may also yield `Unreadable` records, which are dropped and counted in
  `skipped` like elements with a `layout.problem`; `max_consecutive` dropped or empty
  elements in a row raise RuntimeError.
  """

  def __init__(self, parent: grain.IterDataset, layout: RowLayout, max_consecutive: int):
    super().__init__(parent)
    self._layout = layout
    self._max_consecutive = max_consecutive

  def __iter__(self) -> _PackedRowIterator:
    return _PackedRowIterator(self._parent.__iter__(), self._layout, self._max_consecutive)

  def __str__(self) -> str:
    return f'PackedIterDataset({type(self._layout).__name__}, seq_len={self._layout.seq_len})'


class PackedRowIterDataset(PackedIterDataset):
  """Rows of `seq_len` tokens packed from the parent's `int32 (n,)` documents (`TextRows`).

  The parent may also yield `Unreadable` records, which are dropped and counted in
  `skipped`; `max_consecutive` unreadable or empty documents in a row raise RuntimeError.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int,
               max_consecutive: int):
    super().__init__(parent, TextRows(seq_len, pad_id), max_consecutive)


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int,
                   pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """All rows (module docstring) that `PackedRowIterDataset` makes of `documents` in order."""
  ds = grain.MapDataset.source([np.asarray(d, np.int32) for d in documents]).to_iter_dataset()
  return list(PackedRowIterDataset(ds, seq_len, pad_id, max(2, len(documents) + 1)))


def padded_batches(rows, empty: dict, batch_size: int, max_batches: int | None,
                   nothing_read: str):
  """Up to `max_batches` batches of `rows` (a batched, finite IterDataset), the last one
  filled up to `batch_size` with copies of the `empty` row, for eval passes whose batches
  must all have one shape. Raises ValueError(nothing_read) when no row held a token."""
  tokens_seen = 0
  for batch in itertools.islice(rows, max_batches):
    missing = batch_size - len(batch['tokens'])
    if missing:
      batch = {k: np.concatenate([v, np.stack([empty[k]] * missing)]) for k, v in batch.items()}
    tokens_seen += int((batch['segment_ids'] > 0).sum())
    yield batch
  if not tokens_seen:
    raise ValueError(nothing_read)
