"""Metric writers (TensorBoard via CLU, plus WORKDIR/metrics.jsonl) and image grids."""
import json
import os
from typing import Any, Mapping

from clu import metric_writers
import jax
import numpy as np

from unimm_jax.inference.image_io import to_uint8


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per written step, `{"step": N, name: value, ...}`.

  Appending (not rewriting) keeps the history of a run resumed after preemption; the
  steps replayed after a resume appear twice, the later line being the one that counts.
  """

  def __init__(self, path: str):
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on process 0; nothing on the others.

  The console gets a short line per logged step from the trainer instead of CLU's
  LoggingWriter, which would print every per-group statistic.
  """
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  os.makedirs(workdir, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(workdir),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Scalars stay; a (g,) vector `code_usage` becomes `code_usage/00`... and its mean."""
  flat = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[name] = float(value)
    elif value.ndim == 1:
      flat[f"{name}/mean"] = float(value.mean())
      for i, v in enumerate(value):
        flat[f"{name}/{i:02d}"] = float(v)
  return flat


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
  """(n, h, w, 3) in [-1, 1] -> one uint8 grid, `columns` wide, row-major, on white with a
  2-px gap after every column and between rows: (rows * (h + 2) - 2, columns * (w + 2), 3)."""
  n, h, w, _ = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + 2) - 2, columns * (w + 2), 3), 255, np.uint8)
  for i in range(n):
    y0, x0 = (i // columns) * (h + 2), (i % columns) * (w + 2)
    grid[y0:y0 + h, x0:x0 + w] = to_uint8(images[i])
  return grid


def reconstruction_grid(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """(n, h, w, 3) pairs -> one (2h + 2, n*(w+2), 3) uint8 grid: originals above recons."""
  return image_grid(np.concatenate([originals, recons]), columns=len(originals))


def flatten_hparams(config) -> dict[str, Any]:
  """Config -> {'model.ch': 128, 'model.ch_mult': '(1, 2)', ...} for TensorBoard hparams."""
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        visit(name + ".", value)
      elif isinstance(value, (bool, int, float, str)):
        flat[name] = value
      else:
        flat[name] = str(value)
  visit("", config)
  return flat
