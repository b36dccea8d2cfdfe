"""Grain input pipelines for image training and the deterministic eval images.

Train pipeline, per host (`build_train_dataset`):

    source (sources.make_source)                      record i: bytes | uint8 array | Unreadable
    [.repeat(k)]                                      tiny sources tiled to >= 1000 records
    .shuffle(seed).repeat()                           infinite; grain reseeds every epoch
    .random_map(ImageTransform, seed)                 rng from (seed, position in the stream)
    _ProcessSlice                                     this host's rows of every global batch
    .to_iter_dataset(ReadOptions)                     threads read and decode ahead
    _SkipCountingIterDataset                          drops Unreadable, counts them
    .batch(host_batch)                                {'image': (b, s, s, 3), 'skipped': (b,)}
    .mp_prefetch(num_workers)                         when data_config.num_workers > 0

Class labels (`with_labels=True`, class-conditional training): the source is
`sources.make_class_indexed_source` (record i: (record, class index)), `_LabelledTransform`
carries the index past the image transform, and every batch also has `'label': int32 (b,)`.
The images, their order, the skips and the iterator state are those of the unlabelled
pipeline.

Everything random derives from `seed` and the element's position in the stream, so the
same seed gives the same batches, and the iterator state (a position per worker) is all a
checkpoint needs to resume bit-identically.

Hosts. Every host indexes the same global stream and reads (and decodes) only its own rows
of each global batch: host h of n takes rows [h*b, (h+1)*b) of every B = n*b positions.
The global batch is therefore the same whatever the number of hosts, and an N-process run
trains on exactly the batches of a one-process run (when every record is readable: each
host drops its own unreadable records, so a bad record shifts only that host's rows).

Skip counting. `skipped[j]` is the number of unreadable records dropped right before
element j in the stream that produced it. With worker processes each worker reads the
interleaved slice `worker::num_workers` of the host stream and counts in its own slice, so a
bad record is counted once, by the worker that met it, on that worker's next good element:
`batch['skipped'].sum()` summed over batches is the number of bad records passed, with or
without workers. (As grain warns for any filtering pipeline, which records land in which
batch depends on num_workers; for a fixed num_workers it is deterministic.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from unimm_jax.data.data_config import parse_resolution_buckets, validate_data_config
from unimm_jax.data.sources import (make_class_indexed_source, make_labelled_source,
                                    make_source)
from unimm_jax.data.transforms import ImageTransform, Unreadable

# Threads that read and decode ahead inside each process (the main one, or each worker).
# PIL decoding releases the GIL, so a few threads overlap I/O and decode; more would only
# fight the train step for the host's cores.
_READ_THREADS = 4

# Grain's index shuffle costs milliseconds per element on ranges of a few dozen (it walks
# cycles of a permutation over a much larger domain), which would dominate a step on the
# builtin photos. Smaller sources are tiled to at least this length before shuffling: an
# epoch then holds each record k times in random order, an equally fair stream.
_MIN_SHUFFLE_SPAN = 1000

# A run of this many unreadable records in a row (or twice the source, if larger) means the
# data, not a few files, is broken: raise instead of spinning forever on an infinite stream.
_MIN_CONSECUTIVE_SKIPS_LIMIT = 1000

# Seeds the extra crop positions of eval images beyond the first pass over the eval set.
_EVAL_CROP_SEED = 0xE7A1


@dataclasses.dataclass(frozen=True)
class _LabelledTransform:
  """`(record, class index)` -> `{'image', 'label': int32}`, or `Unreadable`; picklable.

  Runs `transform` on the record with grain's rng, so the image is the one the unlabelled
  pipeline would make from the same position.
  """

  transform: ImageTransform

  def __call__(self, element: tuple[Any, int | None], rng: np.random.Generator | None):
    record, label = element
    out = self.transform(record, rng)
    if isinstance(out, Unreadable):
      return out
    return {**out, 'label': np.int32(label)}


class _SkipCountingIterator(grain.DatasetIterator):
  """Yields `{'image': ..., ['label': ...,] 'skipped': int32}`, dropping and counting
  `Unreadable` records.

  The count restarts at every yielded element, so between two `next` calls it is always
  zero and the parent's state is the whole state: get/set_state delegate to the parent.
  """

  def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
    super().__init__(parent)
    self._max_consecutive = max_consecutive
    self._skipped_total = 0

  def __next__(self) -> dict[str, Any]:
    skipped = 0
    while True:
      element = next(self._parent)
      if not isinstance(element, Unreadable):
        return {**element, 'skipped': np.int32(skipped)}
      skipped += 1
      self._skipped_total += 1
      logging.log_every_n(logging.WARNING, 'Skipping unreadable record (%d so far in this '
                          'process): %s', 100, self._skipped_total, element.reason)
      if skipped >= self._max_consecutive:
        raise RuntimeError(f'{skipped} unreadable records in a row; the data looks broken. '
                           f'Last one: {element.reason}')

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _SkipCountingIterDataset(grain.IterDataset):
  """Drops `Unreadable` elements of `parent` and records how many preceded each kept one."""

  def __init__(self, parent: grain.IterDataset, max_consecutive: int):
    super().__init__(parent)
    self._max_consecutive = max_consecutive

  def __iter__(self) -> _SkipCountingIterator:
    return _SkipCountingIterator(self._parent.__iter__(), self._max_consecutive)

  def __str__(self) -> str:
    return f'_SkipCountingIterDataset(max_consecutive={self._max_consecutive})'


class _ProcessSlice(grain.MapDataset):
  """One host's rows of every global batch of `parent`, a global stream of records.

  Element j is the parent's position (j // b) * B + index * b + j % b, with the host batch
  b = B / count. The parent's random_map keys each record's augmentation by that global
  position, so a row's crop does not depend on how many hosts share the batch.
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch: int, index: int, count: int):
    super().__init__(parent)
    self._global_batch = global_batch
    self._host_batch = global_batch // count
    self._offset = index * self._host_batch

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch * self._host_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    row, column = divmod(index, self._host_batch)
    return self._parent[row * self._global_batch + self._offset + column]

  def __str__(self) -> str:
    return (f'_ProcessSlice(global_batch={self._global_batch}, '
            f'rows={self._offset}:{self._offset + self._host_batch})')


def shuffled_shard(source, *, seed: int, unit: str, shard_index: int = 0,
                   shard_count: int = 1) -> grain.MapDataset:
  """Records `shard_index::shard_count` of `source`, shuffled with `seed`, repeated forever.

  Grain reshuffles every epoch. `unit` names the records in the error for an empty shard
  (`'records'`, `'documents'`).
  """
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f'shard {shard_index} of {shard_count} of {source!r} is empty: more '
                     f'hosts than {unit}')
  if len(ds) < _MIN_SHUFFLE_SPAN:
    ds = ds.repeat(-(-_MIN_SHUFFLE_SPAN // len(ds)))
  return ds.shuffle(seed=seed).repeat(None)


def max_consecutive_skips(source) -> int:
  """How many unreadable records in a row mean that the data of `source` is broken."""
  return max(_MIN_CONSECUTIVE_SKIPS_LIMIT, 2 * len(source))


def prefetch_in_workers(it: grain.IterDataset,
                        data_config: ml_collections.ConfigDict) -> grain.IterDataset:
  """`it` read by `data_config.num_workers` grain processes, or `it` itself when that is 0."""
  if data_config.num_workers == 0:
    return it
  # grain 0.2.18 reads an absl flag when starting workers and raises if flags were never
  # parsed (google/grain#1355), which is the case outside absl.app (tests, notebooks).
  # Flags parsed by main.py are left alone; otherwise every flag keeps its default.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=data_config.num_workers,
      per_worker_buffer_size=data_config.worker_buffer_size))


def host_batch_size(global_batch_size: int) -> int:
  """This host's share of `global_batch_size`; it must split evenly over the processes."""
  process_count = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be a positive multiple of '
                     f'the process count {process_count}')
  return global_batch_size // process_count


def _derive_seeds(seed: int) -> tuple[int, int]:
  """Independent uint32 seeds for the shuffle and for the augmentations from one int seed."""
  shuffle_seed, augment_seed = np.random.SeedSequence(int(seed) % 2**64).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def _batched_train_dataset(data_config: ml_collections.ConfigDict, source, *, image_size: int,
                           batch_size: int, seed: int, shard_index: int, shard_count: int,
                           with_labels: bool) -> grain.IterDataset:
  """One resolution's shuffled, augmented batches of one shard (no worker processes).

  With `with_labels`, `source` is a `sources.ClassIndexedSource`.
  """
  shuffle_seed, augment_seed = _derive_seeds(seed)
  ds = shuffled_shard(source, seed=shuffle_seed, unit='records')
  transform = ImageTransform(image_size, data_config.resize_mode, data_config.flip)
  if with_labels:
    transform = _LabelledTransform(transform)
  ds = ds.random_map(transform, seed=augment_seed)
  if shard_count > 1:
    ds = _ProcessSlice(ds, global_batch=batch_size * shard_count, index=shard_index,
                       count=shard_count)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                            prefetch_buffer_size=max(batch_size, 16)))
  it = _SkipCountingIterDataset(it, max_consecutive_skips(source))
  return it.batch(batch_size, drop_remainder=True)


def train_buckets(data_config: ml_collections.ConfigDict,
                  global_batch_size: int) -> tuple[tuple[int, int], ...]:
  """(side, global batch) of every train resolution: `resolution_buckets`, or one bucket."""
  return (parse_resolution_buckets(data_config.resolution_buckets)
          or ((data_config.image_size, global_batch_size),))


def build_train_dataset(data_config: ml_collections.ConfigDict, *, batch_size: int,
                        seed: int, shard_index: int = 0, shard_count: int = 1,
                        with_labels: bool = False) -> grain.IterDataset:
  """The infinite, shuffled, augmented, batched train dataset of one shard (host).

  Args:
    data_config: the `data` config (fields in `data_config.py`).
    batch_size: batch size of this shard (single-resolution training).
    seed: root seed; the shuffle and augmentation seeds derive from it.
    shard_index: this shard, in [0, shard_count); it reads rows
      [shard_index * batch_size, (shard_index + 1) * batch_size) of every global batch.
    shard_count: number of shards (hosts).
    with_labels: add each image's class index (`sources.make_class_indexed_source`; names
      from `sources.class_names`).

  Returns:
    A grain IterDataset of `{'image': float32 (b, s, s, 3) in [-1, 1], 'skipped': int32
    (b,)}` (with_labels: also `'label': int32 (b,)`) with `s = data_config.image_size` and
    b = batch_size, or, with `resolution_buckets`, batches of each bucket's side and its
    global batch / shard_count in turn (bucket 0, 1, ..., 0, 1, ...; a deterministic,
    checkpointable round robin), so that a jitted step compiles once per bucket.

  Raises:
    ValueError naming data_config.source when `with_labels` is set for a source without
    class labels (builtin, synthetic, scenes, array_record).
  """
  validate_data_config(data_config)
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  source = (make_class_indexed_source(data_config) if with_labels
            else make_source(data_config, 'train'))
  buckets = parse_resolution_buckets(data_config.resolution_buckets)
  if not buckets:
    it = _batched_train_dataset(data_config, source, image_size=data_config.image_size,
                                batch_size=batch_size, seed=seed, shard_index=shard_index,
                                shard_count=shard_count, with_labels=with_labels)
    return prefetch_in_workers(it, data_config)
  per_bucket = []
  for i, (side, global_batch) in enumerate(buckets):
    if global_batch % shard_count:
      raise ValueError(f'data_config.resolution_buckets: global batch {global_batch} of the '
                       f'{side} px bucket is not divisible by {shard_count} hosts')
    # Each bucket its own seed, so the buckets do not see the same crops in the same order.
    per_bucket.append(_batched_train_dataset(
        data_config, source, image_size=side, batch_size=global_batch // shard_count,
        seed=seed + 7919 * i, shard_index=shard_index, shard_count=shard_count,
        with_labels=with_labels))
  return prefetch_in_workers(grain.IterDataset.mix(per_bucket, [1.0] * len(buckets)),
                             data_config)


def build_train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                         seed: int, with_labels: bool = False) -> grain.DatasetIterator:
  """This host's infinite train iterator, checkpointable with grain / Orbax.

  The host reads its rows (`jax.process_index()` of `jax.process_count()`) of every global
  batch and yields batches of `global_batch_size // jax.process_count()`:
  `{'image': float32 (b, s, s, 3) in [-1, 1], 'skipped': int32 (b,)}`, with `with_labels`
  also `'label': int32 (b,)`, the class indices (`build_train_dataset`).

  Checkpoint it with `it.get_state()` / `it.set_state(state)`, or inside an Orbax
  `ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it))` (restore with
  `CheckpointRestore` on a freshly built iterator of the same config and seed).
  """
  ds = build_train_dataset(data_config, batch_size=host_batch_size(global_batch_size),
                           seed=seed, shard_index=jax.process_index(),
                           shard_count=jax.process_count(), with_labels=with_labels)
  return iter(ds)


def iter_eval_images(data_config: ml_collections.ConfigDict, num_images: int,
                     with_labels: bool = False):
  """Yields the deterministic held-out eval images one by one, `float32 (s, s, 3)`.

  Reads the eval split of `sources.make_source` in order and takes the eval view of each
  record: centre crop (random_crop / center_crop modes) or full resize, never flipped. When
  `num_images` exceeds the readable eval records the set is cycled; in random_crop mode the
  later passes cut crops at fixed pseudo-random positions (seeded by the image's position),
  in the other modes they repeat the same views. Unreadable records are skipped.

  With `with_labels`, yields (image, class label) pairs from `sources.make_labelled_source`
  instead: a str (folder subdirectory) or int (TFDS `label`, class scene index); unlabelled
  sources raise.
  """
  validate_data_config(data_config)
  if num_images < 0:
    raise ValueError(f'num_images must be >= 0, got {num_images}')
  if with_labels:
    source = make_labelled_source(data_config)
    read = source.labelled
  else:
    source = make_source(data_config, 'eval')

    def read(index):
      return source[index], None
  transform = ImageTransform(data_config.image_size, data_config.resize_mode, flip=False)
  produced = position = failures_in_a_row = 0
  while produced < num_images:
    rng = (None if position < len(source)
           else np.random.default_rng([_EVAL_CROP_SEED, position]))
    record, label = read(position % len(source))
    out = transform(record, rng)
    position += 1
    if isinstance(out, Unreadable):
      failures_in_a_row += 1
      if failures_in_a_row >= len(source):
        raise ValueError(f'eval source {source!r} has no readable image; last error: '
                         f'{out.reason}')
      continue
    failures_in_a_row = 0
    produced += 1
    yield (out['image'], label) if with_labels else out['image']


def iter_eval_batches(data_config: ml_collections.ConfigDict, num_images: int,
                      batch_size: int, with_labels: bool = False):
  """`iter_eval_images` in batches `float32 (b, s, s, 3)`; the last one may be smaller.

  With `with_labels`, yields (images (b, s, s, 3), labels (b,) str or int64) pairs.
  """
  def stack(batch):
    if not with_labels:
      return np.stack(batch)
    images, labels = zip(*batch)
    return np.stack(images), np.asarray(labels)

  batch = []
  for item in iter_eval_images(data_config, num_images, with_labels):
    batch.append(item)
    if len(batch) == batch_size:
      yield stack(batch)
      batch = []
  if batch:
    yield stack(batch)


def build_eval_images(data_config: ml_collections.ConfigDict,
                      num_images: int) -> np.ndarray:
  """All of `iter_eval_images` at once, `float32 (num_images, s, s, 3)` in [-1, 1]."""
  images = list(iter_eval_images(data_config, num_images))
  size = data_config.image_size
  return np.stack(images) if images else np.zeros((0, size, size, 3), np.float32)
