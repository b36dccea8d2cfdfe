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
"""

from __future__ import annotations

from typing import Any, Sequence

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


class _PackedRowIterator(grain.DatasetIterator):
  """Packs the parent's token arrays into rows; drops and counts `Unreadable` records.

  State: `{'parent': parent state right before the document in progress, 'used': how many
  of its tokens earlier rows took}`, or the parent's current state and 0 between documents.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int,
               max_consecutive: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._max_consecutive = max_consecutive
    self._document = None  # int32 (n,) of the document in progress, or None
    self._document_state = None
    self._used = 0
    self._used_on_restore = 0
    self._skipped_total = 0

  def __next__(self) -> dict[str, np.ndarray]:
    segments, room, skipped, consecutive = [], self._seq_len, 0, 0
    while room:
      if self._document is None:
        state = self._parent.get_state()
        try:
          record = next(self._parent)
        except StopIteration:
          if segments or skipped:  # a finite stream: its last row is padded
            break
          raise
        if isinstance(record, Unreadable) or len(record) == 0:
          consecutive += 1
          if consecutive >= self._max_consecutive:
            raise RuntimeError(f'{consecutive} unreadable or empty documents in a row; the '
                               f'data looks broken. Last: {record}')
          if isinstance(record, Unreadable):
            skipped += 1
            self._skipped_total += 1
            logging.log_every_n(logging.WARNING, 'Skipping unreadable document (%d so far in '
                                'this process): %s', 100, self._skipped_total, record.reason)
          continue
        self._document, self._document_state = record, state
        self._used, self._used_on_restore = self._used_on_restore, 0
      rest = len(self._document) - self._used
      if segments and room < rest <= self._seq_len:
        break  # it fits an empty row whole: start the next row with it instead of cutting
      take = min(rest, room)
      segments.append(self._document[self._used:self._used + take])
      self._used += take
      room -= take
      consecutive = 0
      if self._used == len(self._document):
        self._document = None
    return packed_row(segments, self._seq_len, self._pad_id, skipped)

  def get_state(self) -> dict[str, Any]:
    if self._document is not None:
      return {'parent': self._document_state, 'used': self._used}
    return {'parent': self._parent.get_state(), 'used': self._used_on_restore}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._document = None
    self._used_on_restore = int(state['used'])


class PackedRowIterDataset(grain.IterDataset):
  """Rows of `seq_len` tokens packed from the parent's `int32 (n,)` documents.

  The parent may also yield `Unreadable` records, which are dropped and counted in
  `skipped`; `max_consecutive` unreadable or empty documents in a row raise RuntimeError.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int,
               max_consecutive: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._max_consecutive = max_consecutive

  def __iter__(self) -> _PackedRowIterator:
    return _PackedRowIterator(self._parent.__iter__(), self._seq_len, self._pad_id,
                              self._max_consecutive)

  def __str__(self) -> str:
    return f'PackedRowIterDataset(seq_len={self._seq_len})'


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int,
                   pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """All rows (module docstring) that `PackedRowIterDataset` makes of `documents` in order."""
  ds = grain.MapDataset.source([np.asarray(d, np.int32) for d in documents]).to_iter_dataset()
  return list(PackedRowIterDataset(ds, seq_len, pad_id, max(2, len(documents) + 1)))
