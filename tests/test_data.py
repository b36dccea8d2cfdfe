"""Tests of unimm_jax.data: sources, transforms, the grain train iterator and eval images."""
import io
import os
import re

from array_record.python.array_record_module import ArrayRecordWriter
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from unimm_jax.data import builtin_images, pipeline, sources, transforms
from unimm_jax.data.data_config import default_data_config


def _config(**overrides):
  cfg = default_data_config()
  cfg.update(overrides)
  return cfg


def _encoded(image: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt)
  return buf.getvalue()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['skipped'], y['skipped'])


def _fingerprints(images: np.ndarray) -> set:
  return {img.tobytes() for img in images}


def _eval_view_fingerprints(records, image_size: int, resize_mode: str) -> set:
  """Fingerprints of the deterministic (unflipped, centred) views of `records`."""
  transform = transforms.ImageTransform(image_size, resize_mode, flip=False)
  return {transform(r, None)['image'].tobytes() for r in records}


def _records_read(state) -> int:
  """Records (good or bad) the iterator has consumed, from its grain state."""
  if 'next_index' in state:
    return state['next_index']
  return sum(s['next_index'] for s in state['iterators_in_use_states'])  # one per worker


@pytest.fixture(name='photo_folder')
def fixture_photo_folder(tmp_path):
  """10 readable photos (JPEG and PNG, in two subfolders) plus 3 bad files and a README.

  Bad: a truncated JPEG, a text file named .png, and a dangling symlink named .jpg. The
  README.txt has no image extension, so the folder source never lists it.
  """
  root = tmp_path / 'photos'
  for i in range(10):
    sub = root / ('a' if i < 5 else 'b')
    sub.mkdir(parents=True, exist_ok=True)
    image = builtin_images.synthetic_image(i, 48)
    fmt, ext = ('JPEG', 'jpg') if i % 2 else ('PNG', 'png')
    (sub / f'img_{i:02d}.{ext}').write_bytes(_encoded(image, fmt))
  good_jpeg = _encoded(builtin_images.synthetic_image(99, 48), 'JPEG')
  (root / 'b' / 'z_truncated.jpg').write_bytes(good_jpeg[:len(good_jpeg) // 2])
  (root / 'b' / 'z_notes.png').write_text('not an image at all\n')
  os.symlink(root / 'gone.jpg', root / 'b' / 'z_dangling.jpg')
  (root / 'README.txt').write_text('ignored: no image extension')
  return root


# ---------------------------------------------------------------- builtin and synthetic


def test_every_builtin_photo_loads_offline_as_rgb():
  for name in builtin_images.BUILTIN_NAMES:
    image = builtin_images.load_builtin(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
    assert min(image.shape[:2]) >= 100, name


def test_builtin_names_expand_sets_and_refuse_eval_photos():
  assert builtin_images.expand_builtin_names(('faces_text', 'camera')) == (
      'astronaut_face', 'chelsea_face', 'text', 'page', 'camera')
  assert builtin_images.expand_builtin_names('faces_text, camera') == (
      builtin_images.expand_builtin_names(('faces_text', 'camera')))
  assert builtin_images.expand_builtin_names('photos') == builtin_images.DEFAULT_TRAIN_NAMES
  assert not set(builtin_images.DEFAULT_TRAIN_NAMES) & set(builtin_images.EVAL_NAMES)
  with pytest.raises(ValueError, match='held out'):
    builtin_images.expand_builtin_names(('astronaut', 'rocket'))
  with pytest.raises(ValueError, match='nope'):
    builtin_images.expand_builtin_names(('nope',))


def test_builtin_train_batches_are_deterministic_per_seed():
  cfg = _config(image_size=32)
  first = _take(pipeline.build_train_iterator(cfg, global_batch_size=8, seed=3), 3)
  again = _take(pipeline.build_train_iterator(cfg, global_batch_size=8, seed=3), 3)
  other = _take(pipeline.build_train_iterator(cfg, global_batch_size=8, seed=4), 3)
  _assert_batches_equal(first, again)
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  for batch in first:
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert batch['skipped'].dtype == np.int32 and not batch['skipped'].any()


def test_builtin_eval_images_are_the_held_out_photos_centre_cropped():
  cfg = _config(image_size=64)
  images = pipeline.build_eval_images(cfg, 5)
  assert images.shape == (5, 64, 64, 3) and images.dtype == np.float32
  np.testing.assert_array_equal(images, pipeline.build_eval_images(cfg, 5))
  for image, name in zip(images, builtin_images.EVAL_NAMES):
    photo = builtin_images.load_builtin(name)
    top, left = (photo.shape[0] - 64) // 2, (photo.shape[1] - 64) // 2
    np.testing.assert_array_equal(
        image, transforms.normalize(photo[top:top + 64, left:left + 64]))
  # Beyond one pass the eval set is cycled with other (fixed) crop positions.
  assert len(_fingerprints(images)) == 5


def test_synthetic_images_are_deterministic_and_varied():
  a = builtin_images.synthetic_image(7, 32)
  np.testing.assert_array_equal(a, builtin_images.synthetic_image(7, 32))
  shapes = [builtin_images.synthetic_image(i, 32).shape for i in range(8)]
  assert all(32 <= h <= 48 and 32 <= w <= 48 and c == 3 for h, w, c in shapes)
  assert len({builtin_images.synthetic_image(i, 32).tobytes() for i in range(8)}) == 8
  cfg = _config(source='synthetic', synthetic_num_images=4, resize_mode='resize')
  eval_set = _fingerprints(pipeline.build_eval_images(cfg, 4))
  train_set = _eval_view_fingerprints(
      [builtin_images.synthetic_image(i, 64) for i in range(4)], 64, 'resize')
  assert len(eval_set) == 4 and not eval_set & train_set


# ---------------------------------------------------------------- transforms


def test_colour_conversion_handles_grey_alpha_bool_and_float():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(transforms.as_rgb_uint8(grey), np.stack([grey] * 3, -1))
  rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black -> white
  assert (transforms.as_rgb_uint8(rgba) == 255).all()
  assert transforms.as_rgb_uint8(np.ones((2, 2), bool)).max() == 255
  assert transforms.as_rgb_uint8(np.full((2, 2, 3), 0.5)).max() == 128
  np.testing.assert_array_equal(transforms.normalize(np.array([0, 255], np.uint8)), [-1, 1])


def test_resize_modes_and_flip():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  rng = np.random.default_rng(1)
  crop = transforms.crop_or_resize(image, 32, 'random_crop', rng)
  assert crop.shape == (32, 32, 3)
  assert any(np.array_equal(crop, image[t:t + 32, l:l + 32])
             for t in range(9) for l in range(29))  # native scale: a window of the input
  small = transforms.crop_or_resize(image, 50, 'random_crop', None)  # short side 40 < 50
  assert small.shape == (50, 50, 3)
  assert transforms.crop_or_resize(image, 20, 'center_crop', None).shape == (20, 20, 3)
  assert transforms.crop_or_resize(image, 16, 'resize', None).shape == (16, 16, 3)
  flips = transforms.ImageTransform(32, 'center_crop', flip=True)
  views = [flips(image, np.random.default_rng(s))['image'] for s in range(8)]
  plain = flips(image, None)['image']
  assert any(np.array_equal(v, plain[:, ::-1]) for v in views)
  assert any(np.array_equal(v, plain) for v in views)


def test_jpeg_draft_decode_matches_full_decode():
  big = np.repeat(np.repeat(builtin_images.synthetic_image(1, 64), 4, 0), 4, 1)
  data = _encoded(big, 'JPEG')
  reduced = transforms.decode_rgb(data, lambda w, h: (w // 4, h // 4))
  assert reduced.shape == (big.shape[0] // 4, big.shape[1] // 4, 3)
  for mode in ('center_crop', 'resize'):
    fast = transforms.ImageTransform(32, mode, False)(data, None)['image']
    full = transforms.ImageTransform(32, mode, False)(transforms.decode_rgb(data), None)
    assert np.abs(fast - full['image']).mean() < 0.05, mode


def test_undecodable_records_become_unreadable_markers():
  transform = transforms.ImageTransform(16, 'random_crop', True)
  jpeg = _encoded(builtin_images.synthetic_image(0, 32), 'JPEG')
  for bad in (jpeg[:len(jpeg) // 2], b'hello', b'', np.zeros((0, 5, 3), np.uint8)):
    assert isinstance(transform(bad, np.random.default_rng(0)), transforms.Unreadable)


# ---------------------------------------------------------------- folder and corrupt files


def test_folder_skips_and_counts_corrupt_files_and_keeps_going(photo_folder):
  cfg = _config(source='folder', path=str(photo_folder), image_size=32)
  source = sources.make_source(cfg, 'train')
  # 13 listed files; sorted position 0 (a/img_00.png) is the held-out eval record.
  assert len(source) == 12
  iterator = pipeline.build_train_iterator(cfg, global_batch_size=4, seed=0)
  batches = _take(iterator, 15)  # 60 good images: several passes over the folder
  skipped = sum(int(b['skipped'].sum()) for b in batches)
  # The iterator's state counts every record read, good or bad.
  assert skipped > 0 and skipped == _records_read(iterator.get_state()) - 60
  images = np.concatenate([b['image'] for b in batches])
  assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
  eval_images = pipeline.build_eval_images(cfg, 2)
  held_out = transforms.ImageTransform(32, 'random_crop', False)(
      (photo_folder / 'a' / 'img_00.png').read_bytes(), None)['image']
  np.testing.assert_array_equal(eval_images[0], held_out)


def test_stride_subset_splits_every_record_into_train_or_held_out():
  records = list(range(250))
  for stride, held_out in ((sources.HOLDOUT_STRIDE, [0, 100, 200]), (50, [0, 50, 100, 150, 200])):
    kwargs = {} if stride == sources.HOLDOUT_STRIDE else {'stride': stride}
    train = sources.StrideSubset(records, held_out=False, **kwargs)
    evaluation = sources.StrideSubset(records, held_out=True, **kwargs)
    assert [evaluation[i] for i in range(len(evaluation))] == held_out
    assert sorted([train[i] for i in range(len(train))] + held_out) == records


def test_missing_or_empty_sources_fail_at_build_naming_the_path(tmp_path):
  build = lambda cfg: pipeline.build_train_iterator(cfg, global_batch_size=2, seed=0)
  missing = str(tmp_path / 'no_such_dir')
  with pytest.raises(ValueError, match='no_such_dir'):
    build(_config(source='folder', path=missing))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('x')
  with pytest.raises(ValueError, match=re.escape(str(empty))):
    build(_config(source='folder', path=str(empty)))
  with pytest.raises(ValueError, match='nothing_here'):
    build(_config(source='array_record', path=str(tmp_path / 'nothing_here-*.arrayrecord')))
  with pytest.raises(ValueError, match='resize_mode'):
    build(_config(resize_mode='stretch'))
  broken = tmp_path / 'broken'
  broken.mkdir()
  for name in ('a.jpg', 'b.png', 'c.jpg'):
    (broken / name).write_bytes(b'garbage')
  broken_cfg = _config(source='folder', path=str(broken))
  with pytest.raises(RuntimeError, match='unreadable records in a row'):
    next(build(broken_cfg))  # all bad: a clear error instead of an endless search
  with pytest.raises(ValueError, match='no readable image'):
    pipeline.build_eval_images(broken_cfg, 1)
  with pytest.raises(ValueError, match='global_batch_size'):
    pipeline.build_train_iterator(_config(), global_batch_size=0, seed=0)


# ---------------------------------------------------------------- ArrayRecord and TFDS


def test_array_record_source_with_a_corrupt_record(tmp_path):
  def write(path, records):
    writer = ArrayRecordWriter(str(path), 'group_size:1')
    for record in records:
      writer.write(record)
    writer.close()

  train = [_encoded(builtin_images.synthetic_image(i, 40), 'PNG') for i in range(5)]
  write(tmp_path / 'train-00000.arrayrecord', train[:3])
  write(tmp_path / 'train-00001.arrayrecord', train[3:] + [b'\xff\xd8 not a jpeg'])
  write(tmp_path / 'eval.arrayrecord', [_encoded(builtin_images.synthetic_image(50, 40),
                                                 'JPEG')])
  cfg = _config(source='array_record', path=str(tmp_path / 'train-*.arrayrecord'),
                eval_split=str(tmp_path / 'eval.arrayrecord'), image_size=24)
  assert len(sources.make_source(cfg, 'train')) == 6
  iterator = pipeline.build_train_iterator(cfg, global_batch_size=5, seed=1)
  batches = _take(iterator, 4)
  assert batches[0]['image'].shape == (5, 24, 24, 3)
  skipped = sum(int(b['skipped'].sum()) for b in batches)
  assert skipped > 0 and skipped == _records_read(iterator.get_state()) - 20
  assert pipeline.build_eval_images(cfg, 3).shape == (3, 24, 24, 3)


def test_tfds_source_reads_a_locally_prepared_dataset(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class UnimmTinyImages(tfds.core.GeneratorBasedBuilder):
    """Six train and two validation images of varied sizes, made from numpy."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'picture': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, 6),
              'validation': self._generate_examples(100, 2)}

    def _generate_examples(self, first, count):
      for i in range(first, first + count):
        yield i, {'picture': builtin_images.synthetic_image(i, 36), 'label': i % 2}

  data_dir = str(tmp_path / 'tfds')
  UnimmTinyImages(data_dir=data_dir, file_format='array_record').download_and_prepare()
  cfg = _config(source='tfds', tfds_name='unimm_tiny_images', tfds_data_dir=data_dir,
                split='train', eval_split='validation', image_size=32, flip=False,
                resize_mode='center_crop')
  batch = next(pipeline.build_train_iterator(cfg, global_batch_size=6, seed=0))
  assert batch['image'].shape == (6, 32, 32, 3) and not batch['skipped'].any()
  train_set = _eval_view_fingerprints(
      [builtin_images.synthetic_image(i, 36) for i in range(6)], 32, 'center_crop')
  assert _fingerprints(batch['image']) <= train_set
  eval_set = _fingerprints(pipeline.build_eval_images(cfg, 2))
  assert eval_set == _eval_view_fingerprints(
      [builtin_images.synthetic_image(i, 36) for i in (100, 101)], 32, 'center_crop')
  elsewhere = _config(source='tfds', tfds_name='unimm_tiny_images',
                      tfds_data_dir=str(tmp_path / 'elsewhere'))
  with pytest.raises(ValueError, match='unimm_tiny_images'):
    pipeline.build_train_iterator(elsewhere, global_batch_size=2, seed=0)


# ---------------------------------------------------------------- sharding and resume


def test_hosts_read_their_rows_of_the_one_host_batches(monkeypatch):
  cfg = _config(source='synthetic', synthetic_num_images=8, image_size=16,
                resize_mode='random_crop', flip=True)
  single = _take(pipeline.build_train_iterator(cfg, global_batch_size=8, seed=0), 3)
  monkeypatch.setattr(pipeline.jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match='multiple of the process count 2'):
    pipeline.build_train_iterator(cfg, global_batch_size=7, seed=0)
  per_host = []
  for host in range(2):
    monkeypatch.setattr(pipeline.jax, 'process_index', lambda host=host: host)
    per_host.append(_take(pipeline.build_train_iterator(cfg, global_batch_size=8, seed=0), 3))
    assert per_host[-1][0]['image'].shape == (4, 16, 16, 3)
  # Host h holds rows 4h..4h+3 of each one-host batch, crops and flips included.
  for step, whole in enumerate(single):
    np.testing.assert_array_equal(
        np.concatenate([per_host[0][step]['image'], per_host[1][step]['image']]),
        whole['image'])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_orbax_resume_continues_with_identical_batches(tmp_path, photo_folder, num_workers):
  cfg = _config(source='folder', path=str(photo_folder), image_size=24,
                num_workers=num_workers, worker_buffer_size=1)
  manager = ocp.CheckpointManager(str(tmp_path / 'ckpt'))
  iterator = pipeline.build_train_iterator(cfg, global_batch_size=4, seed=5)
  before = _take(iterator, 3)
  manager.save(3, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = _take(iterator, 6)  # the uninterrupted run
  # Skips are counted with and without workers: every record read is a batch row or a skip.
  skipped = sum(int(b['skipped'].sum()) for b in before + expected)
  assert skipped > 0 and skipped == _records_read(iterator.get_state()) - 9 * 4
  iterator.close()
  restored = pipeline.build_train_iterator(cfg, global_batch_size=4, seed=5)
  manager.restore(3, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointRestore(restored)))
  resumed = _take(restored, 6)
  restored.close()
  manager.close()
  _assert_batches_equal(expected, resumed)
