"""Tests of class-labelled images: scene classes, labelled train batches, the classifier."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from unimm_jax.data import builtin_images, pipeline, scenes, sources
from unimm_jax.data.data_config import default_data_config
from unimm_jax.evals import scene_classes


def _config(**overrides):
  cfg = default_data_config()
  cfg.update(overrides)
  return cfg


def _pixels(image: np.ndarray) -> np.ndarray:
  """float image in [-1, 1] -> uint8, exactly inverting the pipeline's normalisation."""
  return np.round((image + 1.0) * 127.5).astype(np.uint8)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _class_renders(split: str, count: int, size: int) -> list[np.ndarray]:
  return [scenes.render(scenes.sample_class_scene(scenes.scene_seed(split, i), i % 28), size)
          for i in range(count)]


def test_class_names_are_the_28_colour_shape_pairs():
  assert len(scenes.CLASS_NAMES) == 28 == len(set(scenes.CLASS_NAMES))
  assert scenes.CLASS_NAMES[:5] == ('red circle', 'red square', 'red triangle', 'red cross',
                                    'green circle')
  assert scenes.CLASS_NAMES[-1] == 'white cross'


def test_class_scene_is_deterministic_and_of_its_class():
  for seed, k in ((0, 0), (17, 13), (999_999, 27), (1_000_003, 6)):
    scene = scenes.sample_class_scene(seed, k)
    assert scene == scenes.sample_class_scene(seed, k)
    assert scenes.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    (obj,) = scene.objects
    assert f'{obj.colour} {obj.shape}' == scenes.CLASS_NAMES[k]
    low, high = scenes.CLASS_RADIUS
    assert low <= obj.radius <= high
    reach = scenes.EXTENT * obj.radius  # every shape's box lies within this of its centre
    assert reach <= min(obj.cx, obj.cy) and max(obj.cx, obj.cy) <= 1.0 - reach
    image = scenes.render(scene, 32)
    np.testing.assert_array_equal(image, scenes.render(scenes.sample_class_scene(seed, k), 32))
    # The object's own colour fills its inside: about pi r^2 of the image for a circle.
    inside = np.all(image == scenes.COLOURS[obj.colour], axis=-1).mean()
    assert inside > 0.5 * obj.radius ** 2
  with pytest.raises(ValueError, match='class_index'):
    scenes.sample_class_scene(0, 28)
  with pytest.raises(ValueError, match='no split'):
    scenes.sample_class_scene(-1, 0)


def test_class_source_records_labels_and_disjoint_splits():
  train = scenes.SceneClassSource('train', 60, 32)
  evaluation = scenes.SceneClassSource('eval', 60, 32)
  assert len(train) == 60 and train.class_names == scenes.CLASS_NAMES
  assert 'SceneClassSource' in repr(train)
  train.check_labels()
  for i in (0, 29, 59):
    image, label = train.labelled(i)
    assert label == i % 28
    np.testing.assert_array_equal(image, train[i])
    np.testing.assert_array_equal(image, _class_renders('train', i + 1, 32)[i])
  train_seeds = {scenes.scene_seed('train', i) for i in range(60)}
  eval_seeds = {scenes.scene_seed('eval', i) for i in range(60)}
  assert not train_seeds & eval_seeds
  assert {scenes.split_of_seed(s) for s in eval_seeds} == {'eval'}
  assert not {train[i].tobytes() for i in range(60)} & {evaluation[i].tobytes()
                                                        for i in range(60)}
  with pytest.raises(IndexError):
    train.labelled(60)


def test_labelled_scene_class_batches_match_their_records_and_resume():
  cfg = _config(source='scene_classes', scenes_num_images=56, image_size=32, flip=True)
  assert sources.class_names(cfg) == scenes.CLASS_NAMES
  label_of = {}
  for i, image in enumerate(_class_renders('train', 56, 32)):
    label_of[image.tobytes()] = label_of[image[:, ::-1].tobytes()] = i % 28
  iterator = pipeline.build_train_iterator(cfg, global_batch_size=8, seed=3, with_labels=True)
  batches = _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  for batch in batches + expected:
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (8,)
    assert not batch['skipped'].any()
    assert [label_of[_pixels(im).tobytes()] for im in batch['image']] == list(batch['label'])
  # Labels leave the images as they were: the unlabelled run yields the same batches.
  plain = _take(pipeline.build_train_iterator(cfg, global_batch_size=8, seed=3), 2)
  assert set(plain[0]) == {'image', 'skipped'}
  for a, b in zip(plain, batches):
    np.testing.assert_array_equal(a['image'], b['image'])
  resumed = pipeline.build_train_iterator(cfg, global_batch_size=8, seed=3, with_labels=True)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 3)):
    for key in ('image', 'label', 'skipped'):
      np.testing.assert_array_equal(a[key], b[key])


def test_scene_class_eval_batches_have_int_labels():
  cfg = _config(source='scene_classes', image_size=32)
  (images, labels), = pipeline.iter_eval_batches(cfg, 30, 30, with_labels=True)
  assert labels.tolist() == [i % 28 for i in range(30)]
  np.testing.assert_array_equal(_pixels(images), np.stack(_class_renders('eval', 30, 32)))


def test_folder_class_indices_are_sorted_subdirectories_and_skips_still_count(tmp_path):
  root = tmp_path / 'imagenet'
  colours = {'n02_dog': (40, 80, 220), 'n01_cat': (220, 40, 40)}  # index 1, index 0
  for name, rgb in colours.items():
    (root / name).mkdir(parents=True)
    for i in range(4):
      buf = io.BytesIO()
      Image.fromarray(np.full((40, 48, 3), rgb, np.uint8)).save(buf, format='PNG')
      (root / name / f'{i}.png').write_bytes(buf.getvalue())
  (root / 'n02_dog' / 'z_broken.png').write_bytes(b'not an image')
  (root / '.cache').mkdir()
  cfg = _config(source='folder', path=str(root), image_size=32)
  assert sources.class_names(cfg) == ('n01_cat', 'n02_dog')
  iterator = pipeline.build_train_iterator(cfg, global_batch_size=6, seed=0, with_labels=True)
  batches = _take(iterator, 6)
  for batch in batches:
    red = _pixels(batch['image'])[:, 0, 0, 0] > 128  # the cat images are red
    assert (batch['label'] == np.where(red, 0, 1)).all()
  assert {int(v) for b in batches for v in b['label']} == {0, 1}
  skipped = sum(int(b['skipped'].sum()) for b in batches)
  assert skipped > 0 and skipped == iterator.get_state()['next_index'] - 36
  Image.fromarray(builtin_images.synthetic_image(0, 40)).save(root / 'loose.png')
  with pytest.raises(ValueError, match="'loose.png'.*class subdirectory"):
    pipeline.build_train_iterator(cfg, global_batch_size=6, seed=0, with_labels=True)


@pytest.mark.parametrize('source', ['builtin', 'synthetic', 'scenes', 'array_record'])
def test_unlabelled_sources_refuse_labels_naming_the_source(source):
  cfg = _config(source=source, path='unused-*.arrayrecord')
  with pytest.raises(ValueError, match=f"data_config.source='{source}' has no class labels"):
    pipeline.build_train_iterator(cfg, global_batch_size=2, seed=0, with_labels=True)
  with pytest.raises(ValueError, match=f"data_config.source='{source}'"):
    sources.class_names(cfg)


@pytest.mark.parametrize('size', [32, 64])
def test_classifier_reads_back_rendered_class_scenes(size):
  images = _class_renders('eval', 280, size)
  wanted = [i % 28 for i in range(280)]
  assert scene_classes.class_check_rate(images, wanted) >= 0.97
  matrix = scene_classes.confusion(images, wanted)
  assert matrix.shape == (28, 29) and matrix.sum() == 280
  # Float images in [-1, 1], as a generator produces them, read the same.
  assert [scene_classes.classify_class_scene(im / 127.5 - 1.0) for im in images[:28]] == [
      scene_classes.classify_class_scene(im) for im in images[:28]]


def test_classifier_finds_no_object_in_backgrounds_and_noise():
  rng = np.random.default_rng(0)
  empty = [scenes.render(scenes.Scene(seed=i, objects=(), background=(40 + i, 50, 45),
                                      texture=t), 64)
           for i, t in enumerate(scenes.TEXTURES)]
  empty += [np.full((32, 32, 3), level, np.uint8) for level in (0, 60, 128, 250)]
  empty += [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (32, 64)]
  empty.append(rng.uniform(-1.0, 1.0, (32, 32, 3)).astype(np.float32))
  assert [scene_classes.classify_class_scene(im) for im in empty] == [-1] * len(empty)
  with pytest.raises(ValueError, match='one class index per image'):
    scene_classes.class_check_rate(empty, [0])


def test_tfds_class_indices_are_the_label_feature_and_names_its_class_label(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class UnimmColourClasses(tfds.core.GeneratorBasedBuilder):
    """Six train images, image i of class i % 3 and coloured by it."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=['red', 'green', 'blue'])}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        image = np.zeros((36, 36, 3), np.uint8)
        image[..., i % 3] = 200
        yield i, {'image': image, 'label': i % 3}

  data_dir = str(tmp_path / 'tfds')
  UnimmColourClasses(data_dir=data_dir, file_format='array_record').download_and_prepare()
  cfg = _config(source='tfds', tfds_name='unimm_colour_classes', tfds_data_dir=data_dir,
                image_size=32)
  assert sources.class_names(cfg) == ('red', 'green', 'blue')
  batch = next(pipeline.build_train_iterator(cfg, global_batch_size=5, seed=0,
                                             with_labels=True))
  assert (_pixels(batch['image'])[:, 0, 0].argmax(-1) == batch['label']).all()
