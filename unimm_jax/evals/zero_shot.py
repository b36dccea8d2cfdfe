"""Zero-shot classification accuracy of a tokenizer's semantic embeddings (paper Table 1).

The paper scores ImageNet-val by zero-shot classification [CLIP]: an image's embedding (here
the discrete tokens pooled by the post head, u_Q = AttnPool_post(U_Q), which lives in the
teacher's space; see `PrePostHeads.zero_shot_embedding`) is compared by cosine similarity with
one text embedding per class from the teacher's text tower, and top-1 / top-5 / top-10
accuracy is reported in percent.
This repository has no text tower, so the class embeddings come from a file, written once
with the teacher's text model (e.g. SigLIP2's, over prompt templates) by `save_class_embeddings`
or any numpy code.

File format (.npz, read without pickle):
  embeddings  (num_classes, d) float; row k is class k, the label value k. Rows need not be
              normalised: they are normalised on load.
  names       optional (num_classes,) str (a numpy unicode array, not objects).
Other keys (e.g. a CLIP `logit_scale`) are ignored: multiplying every score by a positive
scale, or adding a shared bias, does not change any ranking and so no accuracy.

Ranking and ties. For image i with label y the rank is the number of *other* classes whose
score is at least the true class's score; the image counts for top-k when rank < k. Ties thus
count against the true class, so a collapsed embedding (all scores equal, e.g. a zero vector)
scores 0, never 100%. Only the class embeddings are normalised: an image's own norm scales
its whole row of scores, which changes no ranking. Scores are float64 on the host.
"""
import dataclasses

import numpy as np

DEFAULT_KS = (1, 5, 10)


@dataclasses.dataclass(frozen=True)
class ClassEmbeddings:
  """Class text embeddings: embeddings (num_classes, d) float (float32 once loaded), names a
  tuple of num_classes str or None."""
  embeddings: np.ndarray
  names: tuple[str, ...] | None = None

  def __post_init__(self):
    e = self.embeddings
    if e.ndim != 2 or not e.shape[0] or not e.shape[1]:
      raise ValueError(f'class embeddings must be (num_classes, d) with both > 0, got shape '
                       f'{e.shape}')
    if not np.issubdtype(e.dtype, np.floating):
      raise ValueError(f'class embeddings must be floating point, got {e.dtype}')
    if not np.all(np.isfinite(e)):
      raise ValueError('class embeddings contain NaN or inf')
    zero = np.flatnonzero(~np.any(e != 0, axis=1))
    if zero.size:
      raise ValueError(f'class embeddings of classes {zero[:10].tolist()} are zero vectors: '
                       'they have no direction to compare with')
    if self.names is not None and len(self.names) != e.shape[0]:
      raise ValueError(f'{len(self.names)} class names for {e.shape[0]} class embeddings')

  @property
  def num_classes(self) -> int:
    return self.embeddings.shape[0]

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]


def save_class_embeddings(path: str, embeddings, names=None) -> None:
  """Writes `embeddings` (num_classes, d) and optional `names` (num_classes,) to `path` (.npz)."""
  classes = ClassEmbeddings(np.asarray(embeddings, np.float32),
                            None if names is None else tuple(str(n) for n in names))
  arrays = {'embeddings': classes.embeddings}
  if classes.names is not None:
    arrays['names'] = np.asarray(classes.names, dtype=np.str_)
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def load_class_embeddings(path: str) -> ClassEmbeddings:
  """Reads a file in the format of the module docstring; errors name the file."""
  with np.load(path, allow_pickle=False) as data:
    if 'embeddings' not in data:
      raise ValueError(f'{path}: no `embeddings` array (found {sorted(data.files)})')
    embeddings = data['embeddings']
    names = None
    if 'names' in data:
      raw = data['names']
      if raw.ndim != 1 or raw.dtype.kind != 'U':
        raise ValueError(f'{path}: `names` must be a 1-D str array, got {raw.dtype} of shape '
                         f'{raw.shape}')
      names = tuple(raw.tolist())
  if not np.issubdtype(embeddings.dtype, np.floating):
    raise ValueError(f'{path}: `embeddings` must be floating point, got {embeddings.dtype}')
  try:
    return ClassEmbeddings(embeddings.astype(np.float32), names)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def top_k_hits(image_embeddings, class_embeddings: np.ndarray, labels,
               ks: tuple[int, ...]) -> np.ndarray:
  """Which images are classified correctly within each k.

  Shapes: image_embeddings (b, d), class_embeddings (num_classes, d) unit rows, labels (b,)
  int in [0, num_classes) -> (b, len(ks)) bool. Ties count against the true class.
  """
  scores = np.asarray(image_embeddings, np.float64) @ class_embeddings.T.astype(np.float64)
  true = scores[np.arange(len(scores)), labels][:, None]
  rank = np.sum(scores >= true, axis=1) - 1  # other classes scoring at least as high
  return rank[:, None] < np.asarray(ks)[None, :]


class ZeroShotAccuracy:
  """Top-k zero-shot accuracy, accumulated batch after batch (host side, numpy).

  Args:
    classes: the class embeddings (see `load_class_embeddings`).
    ks: the k of each top-k. None -> (1, 5, 10) without the k that exceed num_classes (a
      top-10 over 5 classes is 100% by construction, not a measurement); an explicit k
      larger than num_classes is an error.
  """

  def __init__(self, classes: ClassEmbeddings, ks: tuple[int, ...] | None = None):
    n = classes.num_classes
    if ks is None:
      ks = tuple(k for k in DEFAULT_KS if k <= n)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
      raise ValueError(f'ZeroShotAccuracy: ks must be positive integers, got {ks}')
    too_large = [k for k in ks if k > n]
    if too_large:
      raise ValueError(f'ZeroShotAccuracy: top-{too_large} asked for, but there are only {n} '
                       'classes')
    self.ks = ks
    self.classes = classes
    e = classes.embeddings.astype(np.float64)
    self._unit_classes = e / np.linalg.norm(e, axis=1, keepdims=True)
    self.hits = np.zeros(len(ks), np.int64)
    self.count = 0

  @classmethod
  def from_file(cls, path: str, ks: tuple[int, ...] | None = None) -> 'ZeroShotAccuracy':
    return cls(load_class_embeddings(path), ks)

  def update(self, image_embeddings, labels) -> None:
    """Adds a batch: image_embeddings (b, d) float, labels (b,) int in [0, num_classes)."""
    images = np.asarray(image_embeddings)
    labels = np.asarray(labels)
    n, d = self.classes.num_classes, self.classes.dim
    if images.ndim != 2:
      raise ValueError(f'ZeroShotAccuracy.update: image embeddings must be (b, d), got shape '
                       f'{images.shape}')
    if images.shape[1] != d:
      raise ValueError(f'ZeroShotAccuracy.update: image embeddings have width {images.shape[1]} '
                       f'but the class embeddings have width {d}; the post head out_dim must '
                       "equal the teacher text tower's width")
    if labels.shape != (images.shape[0],):
      raise ValueError(f'ZeroShotAccuracy.update: labels shape {labels.shape} does not match '
                       f'{images.shape[0]} image embeddings')
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'ZeroShotAccuracy.update: labels must be integers, got {labels.dtype}')
    if labels.size and (labels.min() < 0 or labels.max() >= n):
      raise ValueError(f'ZeroShotAccuracy.update: labels span [{labels.min()}, {labels.max()}], '
                       f'outside [0, {n})')
    # NaN scores compare False against everything, which would make a NaN image a hit.
    if not np.all(np.isfinite(images.astype(np.float64))):
      raise ValueError('ZeroShotAccuracy.update: image embeddings contain NaN or inf')
    self.hits += top_k_hits(images, self._unit_classes, labels, self.ks).sum(axis=0)
    self.count += images.shape[0]

  def result(self) -> dict[str, float | int]:
    """{'zero_shot_top{k}': accuracy in percent for each k, 'zero_shot_num_images': count}."""
    if not self.count:
      raise ValueError('ZeroShotAccuracy: no images seen yet')
    results = {f'zero_shot_top{k}': 100.0 * float(h) / self.count
               for k, h in zip(self.ks, self.hits)}
    results['zero_shot_num_images'] = self.count
    return results
