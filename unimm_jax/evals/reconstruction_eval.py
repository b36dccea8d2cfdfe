"""The tokenizer evaluation loop: PSNR, SSIM, LPIPS, rFID and code usage over an eval set.

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

BatchFn = Callable[[np.ndarray], np.ndarray]


def _pad(images: np.ndarray, batch_size: int) -> np.ndarray:
  missing = batch_size - len(images)
  if missing == 0:
    return images
  return np.concatenate([images, np.repeat(images[-1:], missing, axis=0)])


def evaluate_reconstruction(batches: Iterable[np.ndarray], batch_size: int, *,
                            reconstruct: BatchFn, encode: BatchFn, codebook_size: int,
                            lpips_distance: Callable[[np.ndarray, np.ndarray], np.ndarray]
                            | None = None,
                            inception_features: BatchFn | None = None) -> dict:
  """Metrics of a tokenizer over `batches` of (b <= batch_size, h, w, 3) images in [-1, 1].

  Returns {'num_images', 'psnr', 'ssim', 'code_usage' (per group/level list),
  'code_usage_mean', 'code_perplexity' (list), 'code_perplexity_mean'} plus 'lpips' and
  'rfid' when their functions are given. PSNR and SSIM are computed on [0, 1] images
  (data_range 1), averaged over images.
  """
  psnrs, ssims, lpipses = [], [], []
  usage = code_usage_lib.CodeUsage(codebook_size)
  real_stats, fake_stats = fid.FeatureStatistics(), fid.FeatureStatistics()
  for images in batches:
    n = len(images)
    padded = _pad(np.asarray(images, np.float32), batch_size)
    recons = np.clip(np.asarray(reconstruct(padded)), -1.0, 1.0)
    real01, fake01 = (images + 1) / 2, (recons[:n] + 1) / 2
    psnrs.append(image_metrics.psnr(real01, fake01, data_range=1.0))
    ssims.append(image_metrics.ssim(real01, fake01, data_range=1.0))
    usage.update(np.asarray(encode(padded))[:n])
    if lpips_distance is not None:
      lpipses.append(np.asarray(lpips_distance(padded, recons))[:n])
    if inception_features is not None:
      real_stats.update(np.asarray(inception_features(padded), np.float64)[:n])
      fake_stats.update(np.asarray(inception_features(recons), np.float64)[:n])
  if not psnrs:
    raise ValueError("evaluate_reconstruction: the eval set is empty")
  usage_result = usage.result()
  results = {
      "num_images": int(sum(len(p) for p in psnrs)),
      "psnr": float(np.mean(np.concatenate(psnrs))),
      "ssim": float(np.mean(np.concatenate(ssims))),
      "code_usage": usage_result["code_usage"].tolist(),
      "code_usage_mean": float(usage_result["code_usage"].mean()),
      "code_perplexity": usage_result["code_perplexity"].tolist(),
      "code_perplexity_mean": float(usage_result["code_perplexity"].mean()),
  }
  if lpips_distance is not None:
    results["lpips"] = float(np.mean(np.concatenate(lpipses)))
  if inception_features is not None:
    results["rfid"] = float(fid.frechet_distance(*real_stats.statistics(),
                                                 *fake_stats.statistics()))
  return results
