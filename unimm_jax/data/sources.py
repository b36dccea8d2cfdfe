"""Random-access image sources: `len(source)` and `source[i] -> SourceRecord`.

A record is encoded image bytes (folder, ArrayRecord, TFDS), a decoded `uint8 (h, w, 3)`
array (builtin, synthetic, scenes) or an `Unreadable` marker when reading the record itself failed
(a file vanished, a permission error, a damaged ArrayRecord chunk). Sources never raise from
`__getitem__`; decoding and its failures are left to `transforms.ImageTransform`.

Every source is cheap to pickle (paths and names, not pixels), because grain sends the
pipeline to its worker processes.

Train / eval split per `data_config.source` (`make_source(data_config, split=...)`):

- `builtin`: train = `builtin_names` (expanded); eval = `builtin_images.EVAL_NAMES`.
- `synthetic`: train = indices `[0, synthetic_num_images)`; eval = the indices after those.
- `scenes`: procedural scenes (`scenes.SceneImageSource`) rendered at `image_size`: train =
  the first `scenes_num_images` train scene seeds, eval = the held-out eval scene seeds
  (`scenes.SPLITS['eval']`, some with colour-shape pairs that train never shows).
- `scene_classes`: one-object class scenes (`scenes.SceneClassSource`, class k the k-th of
  `scenes.CLASS_NAMES`) rendered at `image_size`: train = the first `scenes_num_images`
  train scene seeds, eval = the eval scene seeds; all 28 classes appear in both.
- `folder`: `path` is a directory searched recursively for files with an image extension
  (`IMAGE_EXTENSIONS`, case-insensitive; hidden files and directories are ignored), sorted
  by relative path. `split` is not used.
- `array_record`: `path` is a glob, a comma-separated list of globs, or a list of them; each
  record is the bytes of one encoded image (JPEG, PNG, ...). Files are sorted by name.
  `split` is not used.
- `tfds`: `tfds.data_source(tfds_name, split=split, data_dir=tfds_data_dir)` on a dataset
  prepared locally (nothing is downloaded). The image feature is `image` or, failing that,
  the only top-level `tfds.features.Image`; it is read undecoded and decoded with PIL.

For folder, array_record and tfds, a non-empty `eval_split` names the eval data: a path in
the format of `path` (folder, array_record) or a TFDS split string such as `validation` or
`train[-1%:]` (tfds). With `eval_split` empty, one record in `HOLDOUT_STRIDE` (source
indices 0, 100, 200, ...) is held out for eval and the train split never sees it.

Class labels (zero-shot classification, `make_labelled_source`): a folder file's label is the
name of its first-level subdirectory (ImageNet-style `val/<class>/<file>`), a str; a TFDS
record's is its integer `label` feature; a class scene's is its class index. builtin,
synthetic, scenes and array_record have none.

Class indices (class-conditional training, `make_class_indexed_source`; names in index order
from `class_names`): scene_classes -> its class index; tfds -> the `label` feature (names
from its ClassLabel); folder -> the position of the file's first-level subdirectory among
the sorted non-hidden subdirectories of `path` (the train root), as ImageNet folders are
numbered.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Protocol, Sequence

import grain
import ml_collections
import numpy as np

from unimm_jax.data import builtin_images
from unimm_jax.data import scenes
from unimm_jax.data.transforms import SourceRecord, Unreadable

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')

HOLDOUT_STRIDE = 100

SOURCES = ('builtin', 'synthetic', 'scenes', 'scene_classes', 'folder', 'array_record',
           'tfds')

LABELLED_SOURCES = ('scene_classes', 'folder', 'tfds')

Label = str | int


class ImageSource(Protocol):
  """What the pipeline needs from a source (grain's RandomAccessDataSource protocol)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> SourceRecord:
    ...


class LabelledSource(ImageSource, Protocol):
  """An image source whose records have class labels (`make_labelled_source`)."""

  def labelled(self, index: int) -> tuple[SourceRecord, Label | None]:
    """(record `index`, its class label); the label is None only for an `Unreadable`."""
    ...


class BuiltinSource:
  """scikit-image photos by name; each photo is decoded once per process and cached."""

  def __init__(self, names: Sequence[str]):
    self.names = tuple(names)
    for name in self.names:
      builtin_images.load_builtin(name)

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> SourceRecord:
    return builtin_images.load_builtin(self.names[index])

  def __repr__(self) -> str:
    return f'BuiltinSource({self.names})'


class SyntheticSource:
  """`num_images` procedural images starting at image number `first_index`."""

  def __init__(self, num_images: int, min_size: int, first_index: int = 0):
    if num_images <= 0:
      raise ValueError(f'data_config.synthetic_num_images must be positive, got {num_images}')
    self.num_images = num_images
    self.min_size = min_size
    self.first_index = first_index

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, index: int) -> SourceRecord:
    return builtin_images.synthetic_image(self.first_index + index, self.min_size)

  def __repr__(self) -> str:
    return f'SyntheticSource({self.num_images} from {self.first_index})'


class FileSource:
  """Encoded image files under `root`; a file that cannot be read becomes `Unreadable`.

  Paths are kept relative to `root`, which halves what is pickled to each worker on large
  folders.
  """

  def __init__(self, root: str, relative_paths: Sequence[str]):
    self.root = root
    self.relative_paths = tuple(relative_paths)

  def __len__(self) -> int:
    return len(self.relative_paths)

  def __getitem__(self, index: int) -> SourceRecord:
    path = os.path.join(self.root, self.relative_paths[index])
    try:
      with open(path, 'rb') as f:
        return f.read()
    except OSError as err:
      return Unreadable(f'{path}: {err}')

  def labelled(self, index: int) -> tuple[SourceRecord, str]:
    """(record, name of the file's first-level subdirectory); see `check_labels`."""
    return self[index], self.relative_paths[index].split(os.sep, 1)[0]

  def check_labels(self) -> None:
    """Raises ValueError when a file lies directly in `root`, outside any class folder."""
    loose = [p for p in self.relative_paths if os.sep not in p]
    if loose:
      raise ValueError(
          f'{len(loose)} image file(s) lie directly in {self.root!r} (e.g. {loose[0]!r}): '
          'class labels (zero-shot classification: config.eval.zero_shot_classes, or '
          "class-conditional training) come from each file's class subdirectory, "
          '<root>/<class>/<file>')

  def __repr__(self) -> str:
    return f'FileSource({self.root!r})'


class ArrayRecordSource:
  """Records of ArrayRecord files, each the bytes of one encoded image."""

  def __init__(self, paths: Sequence[str]):
    self.paths = tuple(paths)
    self._records = grain.sources.ArrayRecordDataSource(list(self.paths))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> SourceRecord:
    try:
      return self._records[index]
    # A damaged chunk surfaces as whatever the C++ reader throws; it costs one record.
    except Exception as err:  # pylint: disable=broad-exception-caught
      return Unreadable(f'array_record {index}: {type(err).__name__}: {err}')

  def __repr__(self) -> str:
    return f'ArrayRecordSource({_describe_paths(self.paths)})'


class TfdsSource:
  """The image feature of a locally prepared TFDS dataset, as encoded bytes."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    # Imported on use: importing TFDS pulls in TensorFlow, seconds that the other sources
    # (and every grain worker process) should not pay.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    where = f'TFDS dataset {name!r} split {split!r} in data_dir {data_dir or "(default)"}'
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      self.image_key = _image_feature_key(builder.info.features, tfds.features.Image)
      self.has_labels = _has_integer_label(builder.info.features, tfds.features.Tensor)
      # A ClassLabel numbers its classes (names '0', '1', ... when none were given); a
      # plain integer Tensor does not say how many there are.
      label = builder.info.features['label'] if self.has_labels else None
      self.label_names = (tuple(label.names)
                          if isinstance(label, tfds.features.ClassLabel) else None)
      self._records = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()})
    except (KeyError, ValueError) as err:
      raise ValueError(f'{where}: {err}') from err
    # TFDS reports a dataset that is not prepared in several ways (AssertionError,
    # DatasetNotFoundError, FileNotFoundError ...); all of them mean the same to the user.
    except Exception as err:  # pylint: disable=broad-exception-caught
      raise ValueError(f'{where} could not be opened (is it prepared there?): '
                       f'{type(err).__name__}: {err}') from err
    self.where = where

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> SourceRecord:
    record = self._read(index)
    return record if isinstance(record, Unreadable) else record[self.image_key]

  def labelled(self, index: int) -> tuple[SourceRecord, int | None]:
    """(image bytes, `label` feature) of record `index`, read in one access; see
    `check_labels`."""
    record = self._read(index)
    if isinstance(record, Unreadable):
      return record, None
    return record[self.image_key], int(record['label'])

  def check_labels(self) -> None:
    """Raises ValueError when the dataset has no integer `label` feature."""
    if not self.has_labels:
      raise ValueError(f'{self.where} has no integer `label` feature, which class labels '
                       '(zero-shot classification: config.eval.zero_shot_classes, or '
                       'class-conditional training) need')

  def _read(self, index: int) -> dict[str, Any] | Unreadable:
    """The feature dict of record `index` (the image undecoded), or `Unreadable`."""
    try:
      return self._records[index]
    # Same reasoning as ArrayRecordSource: one damaged record must not stop the run.
    except Exception as err:  # pylint: disable=broad-exception-caught
      return Unreadable(f'{self.where} record {index}: {type(err).__name__}: {err}')

  def __repr__(self) -> str:
    return f'TfdsSource({self.where})'


def _describe_paths(paths: Sequence[str]) -> str:
  """`'a'` or `'a' and 3 more`: names ArrayRecord files in messages without flooding them."""
  if len(paths) == 1:
    return repr(paths[0])
  return f'{paths[0]!r} and {len(paths) - 1} more'


def _image_feature_key(features, image_feature_type) -> str:
  """`'image'` if that is an Image feature, else the only top-level Image feature."""
  if 'image' in features and isinstance(features['image'], image_feature_type):
    return 'image'
  keys = [k for k, v in features.items() if isinstance(v, image_feature_type)]
  if len(keys) != 1:
    raise ValueError(f'expected one top-level Image feature, found {keys or "none"}')
  return keys[0]


def _has_integer_label(features, tensor_feature_type) -> bool:
  """Whether `features` has a scalar integer `label` (a ClassLabel is such a Tensor)."""
  label = features['label'] if 'label' in features else None
  return (isinstance(label, tensor_feature_type) and label.shape == ()
          and np.issubdtype(label.np_dtype, np.integer))


class StrideSubset:
  """The records of `parent` at positions that are (eval) or are not (train) held out.

  Held out are positions `0, stride, 2 * stride, ...`; the mapping is arithmetic, so no
  index table travels to the workers.
  """

  def __init__(self, parent: ImageSource, held_out: bool, stride: int = HOLDOUT_STRIDE):
    if stride < 2:
      raise ValueError(f'stride must be >= 2 to leave train records, got {stride}')
    self.parent = parent
    self.held_out = held_out
    self.stride = stride
    n = len(parent)
    num_held_out = -(-n // stride)
    self._len = num_held_out if held_out else n - num_held_out

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> SourceRecord:
    return self.parent[self._parent_index(index)]

  def labelled(self, index: int) -> tuple[SourceRecord, Label | None]:
    """The parent's `labelled` (folder and TFDS parents only)."""
    return self.parent.labelled(self._parent_index(index))

  def _parent_index(self, index: int) -> int:
    """Position in `parent` of this subset's record `index`."""
    if self.held_out:
      return index * self.stride
    per_block = self.stride - 1
    return (index // per_block) * self.stride + index % per_block + 1

  def __repr__(self) -> str:
    part = 'held out' if self.held_out else 'train'
    return f'StrideSubset({part} of {self.parent!r})'


def list_files(root: str, extensions: tuple[str, ...], kind: str,
               field: str = 'path') -> list[str]:
  """Sorted paths, relative to `root`, of the files under it (recursive) whose extension,
  lower-cased, is in `extensions`.

  Hidden files and directories are skipped. Errors name the config field `field` and call
  the files `kind` files (`'image'`, `'text'`).
  """
  if not os.path.isdir(root):
    raise ValueError(f'data_config.{field}: {kind} folder {root!r} does not exist or is not '
                     'a directory')
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    paths.extend(
        os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
        if not f.startswith('.') and os.path.splitext(f)[1].lower() in extensions)
  if not paths:
    raise ValueError(f'data_config.{field}: {kind} folder {root!r} holds no {kind} files '
                     f'(extensions {extensions})')
  return sorted(paths)


def list_image_files(root: str, field: str = 'path') -> list[str]:
  """`list_files` for the `IMAGE_EXTENSIONS` files under `root`."""
  return list_files(root, IMAGE_EXTENSIONS, 'image', field)


def expand_globs(spec, source: str, kind: str, field: str = 'path') -> list[str]:
  """Files matching `spec` (a glob, comma-separated globs, or a list), sorted per glob.

  Directories that a glob matches are left out. Errors name the config field `field`, the
  data source `source` (`'array_record'`, `'jsonl'`) and its files as `kind` files.
  """
  patterns = spec.split(',') if isinstance(spec, str) else list(spec)
  patterns = [p.strip() for p in patterns if p.strip()]
  if not patterns:
    raise ValueError(f'data_config.{field} is empty; source {source} needs a glob or a list '
                     f'of {kind} files')
  paths = []
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not matches:
      raise ValueError(f'data_config.{field}: no {kind} file matches {pattern!r}')
    paths.extend(matches)
  return paths


def _raw_source(data_config: ml_collections.ConfigDict, field: str) -> ImageSource:
  """The folder / array_record / tfds source that config field `field` points at.

  `field` is `path` (train data) or `eval_split`; for tfds `path` means `split`.
  """
  location = data_config[field]
  if data_config.source == 'folder':
    return FileSource(location, list_image_files(location, field))
  if data_config.source == 'array_record':
    return ArrayRecordSource(expand_globs(location, 'array_record', 'ArrayRecord', field))
  split = data_config.split if field == 'path' else location
  return TfdsSource(data_config.tfds_name, split, data_config.tfds_data_dir or None)


def make_source(data_config: ml_collections.ConfigDict, split: str) -> ImageSource:
  """Builds the train (`split='train'`) or eval (`split='eval'`) source of `data_config`.

  `data_config` is assumed valid (`data_config.validate_data_config`).

  Raises:
    ValueError naming the offending path / name when the source is missing or empty.
  """
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  train = split == 'train'
  kind = data_config.source
  if kind == 'builtin':
    names = (builtin_images.expand_builtin_names(data_config.builtin_names) if train
             else builtin_images.EVAL_NAMES)
    return BuiltinSource(names)
  if kind == 'synthetic':
    n = data_config.synthetic_num_images
    return SyntheticSource(n, data_config.image_size, first_index=0 if train else n)
  if kind in ('scenes', 'scene_classes'):
    scene_source = scenes.SceneImageSource if kind == 'scenes' else scenes.SceneClassSource
    if train:
      return scene_source('train', data_config.scenes_num_images, data_config.image_size)
    start, stop = scenes.SPLITS['eval']
    return scene_source('eval', stop - start, data_config.image_size)
  if data_config.eval_split and not train:
    source = _raw_source(data_config, 'eval_split')
  else:
    source = _raw_source(data_config, 'path')
    if not data_config.eval_split:
      if len(source) < 2:
        raise ValueError(
            f'{source!r} has {len(source)} record(s); holding out an eval set needs at '
            'least 2 (or set data_config.eval_split)')
      source = StrideSubset(source, held_out=not train)
  if len(source) == 0:
    raise ValueError(f'{source!r} is empty')
  return source


def make_labelled_source(data_config: ml_collections.ConfigDict) -> LabelledSource:
  """The eval source of `data_config` (as `make_source`), with `labelled(i)` -> (record, label).

  Raises:
    ValueError when the source has no class labels: builtin, synthetic, scenes or
    array_record, a folder with image files outside class subdirectories, a TFDS dataset
    without a `label`.
  """
  _require_labels(data_config, 'zero-shot classification (config.eval.zero_shot_classes)')
  source = make_source(data_config, 'eval')
  _unwrapped(source).check_labels()
  return source


def _unwrapped(source: ImageSource) -> ImageSource:
  """The source that `StrideSubset` holds out from, or `source` itself."""
  return source.parent if isinstance(source, StrideSubset) else source


def _require_labels(data_config: ml_collections.ConfigDict, needed_by: str) -> None:
  """Raises ValueError naming data_config.source (and what `needed_by` the labels) when the
  source has no class labels."""
  if data_config.source not in LABELLED_SOURCES:
    raise ValueError(f'data_config.source={data_config.source!r} has no class labels, which '
                     f'{needed_by} needs; use one of {LABELLED_SOURCES} (see '
                     'unimm_jax/data/sources.py)')


def _class_subdirectories(root: str) -> tuple[str, ...]:
  """Sorted names of the non-hidden first-level subdirectories of `root` (folder classes)."""
  if not os.path.isdir(root):
    raise ValueError(f'data_config.path: image folder {root!r} does not exist or is not a '
                     'directory')
  with os.scandir(root) as entries:
    names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
  if not names:
    raise ValueError(f'data_config.path: image folder {root!r} has no class subdirectories '
                     '(<root>/<class>/<file>), which class labels need')
  return tuple(names)


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The names of the train classes of `data_config`, in class-index order.

  scene_classes: `scenes.CLASS_NAMES`; folder: the sorted class subdirectories of `path`;
  tfds: the names of the `label` ClassLabel ('0', '1', ... when it has none).

  Raises:
    ValueError naming data_config.source for an unlabelled source, or the TFDS dataset when
    its `label` is missing or not a ClassLabel (its class count is then unknown).
  """
  _require_labels(data_config, 'class-conditional training (with_labels=True)')
  if data_config.source == 'scene_classes':
    return scenes.CLASS_NAMES
  if data_config.source == 'folder':
    return _class_subdirectories(data_config.path)
  source = _unwrapped(make_source(data_config, 'train'))
  source.check_labels()
  if source.label_names is None:
    raise ValueError(f'{source.where}: its `label` feature is not a ClassLabel, so the class '
                     'names (and count) are unknown')
  return source.label_names


class ClassIndexedSource:
  """Records of a labelled source paired with their class index: `(record, int | None)`.

  String labels (folder subdirectories) become their position in `names`; integer labels
  (TFDS, class scenes) are class indices already. The index is None only for an
  `Unreadable` record without a label, which the pipeline drops anyway.
  """

  def __init__(self, parent: LabelledSource, names: Sequence[str]):
    self.parent = parent
    self._index_of = {name: i for i, name in enumerate(names)}

  def __len__(self) -> int:
    return len(self.parent)

  def __getitem__(self, index: int) -> tuple[SourceRecord, int | None]:
    record, label = self.parent.labelled(index)
    if isinstance(label, str):
      label = self._index_of[label]
    return record, label

  def __repr__(self) -> str:
    return f'ClassIndexedSource({self.parent!r})'


def make_class_indexed_source(data_config: ml_collections.ConfigDict) -> ClassIndexedSource:
  """The train source of `data_config` (as `make_source`) with class indices (docstring).

  Raises:
    ValueError naming data_config.source for builtin, synthetic, scenes and array_record;
    ValueError for a folder with files outside class subdirectories or a TFDS dataset
    without an integer `label`.
  """
  _require_labels(data_config, 'class-conditional training (with_labels=True)')
  source = make_source(data_config, 'train')
  _unwrapped(source).check_labels()
  # Only folder labels are names; the others are indices already and need no name table.
  names = class_names(data_config) if data_config.source == 'folder' else ()
  return ClassIndexedSource(source, names)
