"""Zero-shot classification in `--mode=eval` (Table 1's metric): labelled eval images, the
mapping of their labels to class embeddings, and one end-to-end run of tiny,table1_row3."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from conftest import read_metrics, run_main
from unimm_jax import config_defaults
from unimm_jax.data import builtin_images, pipeline, transforms
from unimm_jax.data.data_config import default_data_config
from unimm_jax.evals.reconstruction_eval import class_indices
from unimm_jax.evals.zero_shot import ClassEmbeddings, save_class_embeddings
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel.context import MeshContext
from unimm_jax.train import tasks
import test_uniwetok_tables

# The tables' SigLIP teacher of hidden size 32, shared as a fixture of this module too.
tiny_teacher = test_uniwetok_tables.tiny_teacher

ROW3 = "configs/uniwetok.py:tiny,table1_row3"
# Per class subdirectory of the eval folder; 'dog' first in the npz, so that the mapping
# cannot pass by sorting the names.
IMAGES_PER_CLASS = {"cat": 2, "dog": 3}
NAMES = ("dog", "cat")


def _write_class_folder(root, images_per_class: dict[str, int]) -> str:
  """root/<class>/<i>.png random 48 px RGB images; returns root."""
  rng = np.random.default_rng(0)
  for name, count in images_per_class.items():
    os.makedirs(root / name)
    for i in range(count):
      pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.png")
  return str(root)


def _data_config(**overrides):
  cfg = default_data_config()
  cfg.update(dict(image_size=32, **overrides))
  return cfg


def test_folder_labels_are_the_class_subdirectories(tmp_path):
  folder = _write_class_folder(tmp_path / "val", IMAGES_PER_CLASS)
  cfg = _data_config(source="folder", path=folder, eval_split=folder)
  batches = list(pipeline.iter_eval_batches(cfg, 5, 4, with_labels=True))
  assert [images.shape for images, _ in batches] == [(4, 32, 32, 3), (1, 32, 32, 3)]
  labels = np.concatenate([labels for _, labels in batches])
  assert labels.tolist() == ["cat", "cat", "dog", "dog", "dog"]  # sorted by relative path
  indices = class_indices(labels, ClassEmbeddings(np.eye(2, dtype=np.float32), NAMES))
  assert indices.tolist() == [1, 1, 0, 0, 0]


def test_tfds_labels_are_the_label_feature_of_the_same_record(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class UnimmLabelledImages(tfds.core.GeneratorBasedBuilder):
    """Four validation images, image i of class 2i mod 3; TFDS stores them shuffled."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": builtin_images.synthetic_image(i, 36), "label": 2 * i % 3}

  data_dir = str(tmp_path / "tfds")
  UnimmLabelledImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  cfg = _data_config(source="tfds", tfds_name="unimm_labelled_images", tfds_data_dir=data_dir,
                     eval_split="validation", resize_mode="center_crop")
  transform = transforms.ImageTransform(32, "center_crop", flip=False)
  label_of_view = {transform(builtin_images.synthetic_image(i, 36), None)["image"].tobytes():
                   2 * i % 3 for i in range(4)}
  pairs = [(image.tobytes(), label)
           for image, label in pipeline.iter_eval_images(cfg, 4, with_labels=True)]
  assert all(isinstance(label, int) for _, label in pairs)
  assert sorted(pairs) == sorted(label_of_view.items())


def test_unlabelled_eval_data_is_refused(tmp_path):
  with pytest.raises(ValueError, match="data_config.source='synthetic' has no class labels"):
    next(pipeline.iter_eval_batches(_data_config(source="synthetic"), 2, 2, with_labels=True))
  folder = _write_class_folder(tmp_path / "val", {"cat": 1})
  Image.fromarray(builtin_images.synthetic_image(0, 48)).save(tmp_path / "val" / "loose.png")
  cfg = _data_config(source="folder", path=folder, eval_split=folder)
  with pytest.raises(ValueError, match="'loose.png'.*config.eval.zero_shot_classes"):
    next(pipeline.iter_eval_batches(cfg, 2, 2, with_labels=True))


def test_label_mapping_errors():
  named = ClassEmbeddings(np.eye(2, dtype=np.float32), NAMES)
  # Integer labels are class indices already; ZeroShotAccuracy checks their range.
  assert class_indices(np.array([1, 0]), named).tolist() == [1, 0]
  with pytest.raises(ValueError, match="eval class 'cow' is not among the 2 `names`"):
    class_indices(np.array(["cat", "cow", "pig"]), named)
  with pytest.raises(ValueError, match="have no `names`"):
    class_indices(np.array(["cat"]), ClassEmbeddings(np.eye(2, dtype=np.float32)))


def test_zero_shot_without_distillation_heads_is_refused(tmp_path):
  config = config_defaults.load_config("configs/uniwetok.py:tiny")
  config.eval.zero_shot_classes = str(tmp_path / "classes.npz")
  with pytest.raises(ValueError, match="config.loss.pre_distill or config.loss.post_distill"):
    context = MeshContext(mesh_lib.make_mesh(config.mesh), config_defaults.sharding_rules(config))
    tasks.build_task(config).evaluate_checkpoint(context, str(tmp_path))


@pytest.mark.e2e
def test_eval_mode_reports_zero_shot_accuracy(tiny_teacher, tmp_path):
  workdir = tmp_path / "run"
  teacher = f"--config.teacher.path={tiny_teacher}"
  run_main(workdir, teacher, "--config.train.steps=2", config=ROW3)
  folder = _write_class_folder(tmp_path / "val", IMAGES_PER_CLASS)
  classes = str(tmp_path / "classes.npz")
  save_class_embeddings(classes, np.random.default_rng(1).normal(size=(2, 32)), NAMES)
  num_images = sum(IMAGES_PER_CLASS.values())
  # Batch 4 over 5 images: the second batch is padded, and the padding must not count.
  proc = run_main(workdir, teacher, "--config.data.source=folder",
                  f"--config.data.path={folder}", f"--config.data.eval_split={folder}",
                  f"--config.eval.num_images={num_images}", "--config.eval.batch_size=4",
                  f"--config.eval.zero_shot_classes={classes}", config=ROW3, mode="eval")
  with open(workdir / "eval_2.json") as f:
    results = json.load(f)
  assert results["num_images"] == results["zero_shot_num_images"] == num_images
  top1 = results["zero_shot_top1"]
  assert 0 <= top1 <= 100 and round(top1 * num_images / 100, 6).is_integer()
  # Top-5 and top-10 over 2 classes would be 100% by construction: zero_shot.py omits them.
  assert "zero_shot_top5" not in results and "zero_shot_top10" not in results
  assert f"zero_shot_top1 {top1:.4f}" in proc.stdout
  assert read_metrics(workdir)[2]["eval/zero_shot_top1"] == pytest.approx(top1)
