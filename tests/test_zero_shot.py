"""Zero-shot top-k accuracy against a hand-computed example, the npz format, and errors."""
import numpy as np
import pytest

from unimm_jax.evals.zero_shot import (ClassEmbeddings, ZeroShotAccuracy, load_class_embeddings,
                                       save_class_embeddings, top_k_hits)

# Four classes in 3-D; class 3 is given unnormalised, (2, 2, 0) ~ (1, 1, 0) / sqrt(2).
CLASSES = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [2, 2, 0]], np.float32)
# Cosine ranking of each image (scores against the unit classes):
#   a (1, .1, 0), label 0: scores (1, .1, 0, .78)    -> class 0 first: rank 0
#   b (3, 3, 0),  label 1: scores (3, 3, 0, 4.24)    -> class 3 above, class 0 tied: rank 2
#   c (0, 0, 0),  label 2: every score 0, all tied   -> rank 3
#   d (0, 0, -1), label 3: scores (0, 0, -1, 0)      -> classes 0 and 1 tied: rank 2
IMAGES = np.array([[1, 0.1, 0], [3, 3, 0], [0, 0, 0], [0, 0, -1]], np.float32)
LABELS = np.array([0, 1, 2, 3])
KS = (1, 2, 3, 4)
EXPECTED_HITS = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]], bool)


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hand_computed_example_with_ties_against_the_true_class():
  np.testing.assert_array_equal(top_k_hits(IMAGES, _unit(CLASSES), LABELS, KS), EXPECTED_HITS)
  accuracy = ZeroShotAccuracy(ClassEmbeddings(CLASSES), ks=KS)
  accuracy.update(IMAGES, LABELS)
  assert accuracy.result() == {'zero_shot_top1': 25.0, 'zero_shot_top2': 25.0,
                               'zero_shot_top3': 75.0, 'zero_shot_top4': 100.0,
                               'zero_shot_num_images': 4}


def test_accumulation_matches_one_pass_and_argsort():
  rng = np.random.default_rng(0)
  classes = rng.normal(size=(12, 6)).astype(np.float32)
  images = rng.normal(size=(50, 6)).astype(np.float32)
  labels = rng.integers(0, 12, size=50)
  streamed = ZeroShotAccuracy(ClassEmbeddings(classes))
  assert streamed.ks == (1, 5, 10)
  for start, stop in [(0, 7), (7, 7), (7, 31), (31, 50)]:
    streamed.update(images[start:stop], labels[start:stop])
  whole = ZeroShotAccuracy(ClassEmbeddings(classes))
  whole.update(images, labels)
  assert streamed.result() == whole.result()
  # Without ties the rank is the position of the label in the sorted cosine scores.
  order = np.argsort(-(_unit(images) @ _unit(classes).T), axis=1)
  position = np.argmax(order == labels[:, None], axis=1)
  result = streamed.result()
  for k in (1, 5, 10):
    assert result[f'zero_shot_top{k}'] == pytest.approx(100 * np.mean(position < k))
  assert result['zero_shot_num_images'] == 50


def test_default_ks_drop_those_above_the_class_count():
  accuracy = ZeroShotAccuracy(ClassEmbeddings(np.eye(6, dtype=np.float32)))
  assert accuracy.ks == (1, 5)
  accuracy.update(np.eye(6), np.arange(6))
  assert accuracy.result() == {'zero_shot_top1': 100.0, 'zero_shot_top5': 100.0,
                               'zero_shot_num_images': 6}
  with pytest.raises(ValueError, match=r'top-\[10\] asked for, but there are only 6 classes'):
    ZeroShotAccuracy(ClassEmbeddings(np.eye(6, dtype=np.float32)), ks=(1, 10))
  with pytest.raises(ValueError, match='positive integers'):
    ZeroShotAccuracy(ClassEmbeddings(np.eye(6, dtype=np.float32)), ks=(0,))


def test_npz_round_trip(tmp_path):
  path = str(tmp_path / 'classes.npz')
  save_class_embeddings(path, CLASSES, names=['cat', 'dog', 'fish', 'cat or dog'])
  loaded = load_class_embeddings(path)
  np.testing.assert_array_equal(loaded.embeddings, CLASSES)
  assert loaded.names == ('cat', 'dog', 'fish', 'cat or dog')
  assert (loaded.num_classes, loaded.dim) == (4, 3)
  save_class_embeddings(path, CLASSES.astype(np.float64))
  loaded = load_class_embeddings(path)
  assert loaded.names is None and loaded.embeddings.dtype == np.float32
  # Keys other than embeddings and names (here a CLIP-style logit scale) are ignored.
  np.savez(path, embeddings=CLASSES, logit_scale=np.float32(100.0))
  accuracy = ZeroShotAccuracy.from_file(path, ks=KS)
  accuracy.update(IMAGES, LABELS)
  assert accuracy.result()['zero_shot_top3'] == 75.0


def test_file_errors(tmp_path):
  path = str(tmp_path / 'bad.npz')
  np.savez(path, embedding=CLASSES)
  with pytest.raises(ValueError, match=r"no `embeddings` array \(found \['embedding'\]\)"):
    load_class_embeddings(path)
  np.savez(path, embeddings=CLASSES, names=np.array([1, 2, 3, 4]))
  with pytest.raises(ValueError, match='`names` must be a 1-D str array'):
    load_class_embeddings(path)
  np.savez(path, embeddings=CLASSES, names=np.array(['a', 'b']))
  with pytest.raises(ValueError, match='2 class names for 4 class embeddings'):
    load_class_embeddings(path)
  np.savez(path, embeddings=np.arange(6).reshape(2, 3))
  with pytest.raises(ValueError, match='must be floating point'):
    load_class_embeddings(path)
  np.savez(path, embeddings=np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match=r'classes \[0, 1\] are zero vectors'):
    load_class_embeddings(path)
  np.savez(path, embeddings=CLASSES[0])
  with pytest.raises(ValueError, match=r'bad.npz: class embeddings must be \(num_classes, d\)'):
    load_class_embeddings(path)


def test_update_errors():
  accuracy = ZeroShotAccuracy(ClassEmbeddings(CLASSES), ks=(1,))
  with pytest.raises(ValueError, match='no images seen yet'):
    accuracy.result()
  with pytest.raises(ValueError, match='width 5 but the class embeddings have width 3'):
    accuracy.update(np.ones((2, 5)), np.array([0, 1]))
  with pytest.raises(ValueError, match=r'must be \(b, d\)'):
    accuracy.update(np.ones(3), np.array([0]))
  with pytest.raises(ValueError, match='does not match 2 image embeddings'):
    accuracy.update(np.ones((2, 3)), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match='labels must be integers'):
    accuracy.update(np.ones((2, 3)), np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match=r'labels span \[0, 4\], outside \[0, 4\)'):
    accuracy.update(np.ones((2, 3)), np.array([0, 4]))
  with pytest.raises(ValueError, match='NaN or inf'):
    accuracy.update(np.array([[np.nan, 0, 0]]), np.array([0]))
  assert accuracy.count == 0
