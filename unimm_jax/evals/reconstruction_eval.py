"""The tokenizer evaluation loop: PSNR, SSIM, LPIPS, rFID, code usage and zero-shot
classification over an eval set.

Host-side and model-agnostic: the caller passes jitted functions from numpy batches to
numpy outputs (reconstructions, codes, LPIPS distances, Inception features) and this loop
accumulates the metrics. Every batch is padded to `batch_size` (repeating its last image)
so each function compiles once; padded outputs are dropped before any metric sees them.
"""
from typing import Callable, Iterable

import numpy as np

from unimm_jax.evals import code_usage as code_usage_lib
from unimm_jax.evals import fid
from unimm_jax.evals import image_metrics
from unimm_jax.evals import zero_shot as zero_shot_lib

BatchFn = Callable[[np.ndarray], np.ndarray]


def _pad(images: np.ndarray, batch_size: int) -> np.ndarray:
  missing = batch_size - len(images)
  if missing == 0:
    return images
  return np.concatenate([images, np.repeat(images[-1:], missing, axis=0)])


def class_indices(labels, classes: zero_shot_lib.ClassEmbeddings) -> np.ndarray:
  """Eval labels (b,) -> class indices (b,) int64, the rows of `classes.embeddings`.

  Integer labels (TFDS) are indices already; str labels (folder subdirectories) are looked
  up in `classes.names`.
  """
  labels = np.asarray(labels)
  if np.issubdtype(labels.dtype, np.integer):
    return labels.astype(np.int64)
  if labels.dtype.kind != "U":
    raise ValueError(f"eval labels must be class indices or class names, got {labels.dtype}")
  if classes.names is None:
    raise ValueError("the eval images are labelled by class name (folder subdirectories) but "
                     "the class embeddings of config.eval.zero_shot_classes have no `names`")
  index = {name: i for i, name in enumerate(classes.names)}
  unknown = [label for label in labels.tolist() if label not in index]
  if unknown:
    raise ValueError(f"eval class {unknown[0]!r} is not among the {len(index)} `names` of "
                     f"config.eval.zero_shot_classes (e.g. {list(classes.names[:3])})")
  return np.array([index[label] for label in labels.tolist()], np.int64)


def evaluate_reconstruction(batches: Iterable, batch_size: int, *,
                            reconstruct: BatchFn, encode: BatchFn | None,
                            codebook_size: int | None,
                            lpips_distance: Callable[[np.ndarray, np.ndarray], np.ndarray]
                            | None = None,
                            inception_features: BatchFn | None = None,
                            zero_shot: tuple[BatchFn, zero_shot_lib.ClassEmbeddings]
                            | None = None,
                            feature_cosine: BatchFn | None = None) -> dict:
  """Metrics of a tokenizer over `batches` of (b <= batch_size, h, w, 3) images in [-1, 1].

  With `zero_shot` = (embed, classes), each batch is instead an (images, labels (b,)) pair
  (see `class_indices`), and embed maps images to (b, d) embeddings compared with classes.
  A continuous tokenizer has no codes: `encode` and `codebook_size` None leave out the code
  statistics. `feature_cosine` maps images to (b,) per-image mean cosines between the
  tokenizer's features and a teacher's (EvoTok's semantic decoder against SigLIP2).

  Returns {'num_images', 'psnr', 'ssim'}, with codes {'code_usage' (per group/level list),
  'code_usage_mean', 'code_perplexity' (list), 'code_perplexity_mean'}, plus 'lpips' and
  'rfid' and 'feature_cosine' when their functions are given, and with `zero_shot` the
  entries of `ZeroShotAccuracy.result` ('zero_shot_top1', ..., 'zero_shot_num_images').
  PSNR and SSIM are computed on [0, 1] images (data_range 1), averaged over images.
  """
  psnrs, ssims, lpipses, cosines = [], [], [], []
  usage = None if encode is None else code_usage_lib.CodeUsage(codebook_size)
  real_stats, fake_stats = fid.FeatureStatistics(), fid.FeatureStatistics()
  accuracy = zero_shot_lib.ZeroShotAccuracy(zero_shot[1]) if zero_shot else None
  for batch in batches:
    if accuracy is not None:
      images, labels = batch
      # Mapped first, so that an unknown class fails before any model runs.
      indices = class_indices(labels, accuracy.classes)
    else:
      images = batch
    n = len(images)
    padded = _pad(np.asarray(images, np.float32), batch_size)
    recons = np.clip(np.asarray(reconstruct(padded)), -1.0, 1.0)
    real01, fake01 = (images + 1) / 2, (recons[:n] + 1) / 2
    psnrs.append(image_metrics.psnr(real01, fake01, data_range=1.0))
    ssims.append(image_metrics.ssim(real01, fake01, data_range=1.0))
    if usage is not None:
      usage.update(np.asarray(encode(padded))[:n])
    if lpips_distance is not None:
      lpipses.append(np.asarray(lpips_distance(padded, recons))[:n])
    if inception_features is not None:
      real_stats.update(np.asarray(inception_features(padded), np.float64)[:n])
      fake_stats.update(np.asarray(inception_features(recons), np.float64)[:n])
    if accuracy is not None:
      accuracy.update(np.asarray(zero_shot[0](padded))[:n], indices)
    if feature_cosine is not None:
      cosines.append(np.asarray(feature_cosine(padded))[:n])
  if not psnrs:
    raise ValueError("evaluate_reconstruction: the eval set is empty")
  results = {
      "num_images": int(sum(len(p) for p in psnrs)),
      "psnr": float(np.mean(np.concatenate(psnrs))),
      "ssim": float(np.mean(np.concatenate(ssims))),
  }
  if usage is not None:
    usage_result = usage.result()
    results.update({
        "code_usage": usage_result["code_usage"].tolist(),
        "code_usage_mean": float(usage_result["code_usage"].mean()),
        "code_perplexity": usage_result["code_perplexity"].tolist(),
        "code_perplexity_mean": float(usage_result["code_perplexity"].mean()),
    })
  if lpips_distance is not None:
    results["lpips"] = float(np.mean(np.concatenate(lpipses)))
  if inception_features is not None:
    results["rfid"] = float(fid.frechet_distance(*real_stats.statistics(),
                                                 *fake_stats.statistics()))
  if accuracy is not None:
    results.update(accuracy.result())
  if feature_cosine is not None:
    results["feature_cosine"] = float(np.mean(np.concatenate(cosines)))
  return results
