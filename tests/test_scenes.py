"""Tests of the procedural scenes: data, conversations, word tokenizer and scene checks."""
import dataclasses
import json
import re

import numpy as np
import pytest

from unimm_jax.data import pipeline, scene_conversations, scenes, sources
from unimm_jax.data.data_config import default_data_config, validate_data_config
from unimm_jax.data.scene_conversations import SceneConversations
from unimm_jax.data.text_tokenizer import load_tokenizer
from unimm_jax.evals import scene_checks

# Written out here, not taken from the code under test.
_PLURAL = {'circles': 'circle', 'squares': 'square', 'triangles': 'triangle',
           'crosses': 'cross'}
_HELD_OUT_TEXT = ('red triangle', 'blue circle', 'yellow cross', 'purple square')


def _texts(messages):
  return [p['text'] for m in messages for p in m['content'] if p['type'] == 'text']


def _matching(objects, **fields):
  return [o for o in objects if all(o[k] == v for k, v in fields.items() if v is not None)]


def _one(objects, **fields):
  found = _matching(objects, **fields)
  assert len(found) == 1, (fields, objects)
  return found[0]


def _recompute_answer(question, objects):
  """The answer to `question` from the scene description alone; asserts the referent is
  unique."""
  if m := re.fullmatch(r'What colour is the (?:(small|large) )?(\w+)\?', question):
    return _one(objects, size=m[1], shape=m[2])['colour']
  if m := re.fullmatch(r'What shape is the (?:(small|large) )?(\w+) object\?', question):
    return _one(objects, size=m[1], colour=m[2])['shape']
  if question == 'How many objects are there?':
    return str(len(objects))
  if m := re.fullmatch(r'How many (\w+) objects are there\?', question):
    return str(len(_matching(objects, colour=m[1])))
  if m := re.fullmatch(r'How many (\w+) are there\?', question):
    return str(len(_matching(objects, shape=_PLURAL[m[1]])))
  if m := re.fullmatch(r'Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?', question):
    a, b = _one(objects, colour=m[1], shape=m[2]), _one(objects, colour=m[3], shape=m[4])
    assert abs(a['cx'] - b['cx']) >= 0.15
    return 'left' if a['cx'] < b['cx'] else 'right'
  if m := re.fullmatch(r'Is there an? (\w+) (\w+)\?', question):
    return 'yes' if _matching(objects, colour=m[1], shape=m[2]) else 'no'
  raise AssertionError(f'unexpected question {question!r}')


def test_scenes_and_records_are_deterministic_by_split_and_index():
  for seed in (0, 17, 1_000_005):
    a, b = scenes.sample_scene(seed), scenes.sample_scene(seed)
    assert a == b and scenes.Scene.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    np.testing.assert_array_equal(scenes.render(a, 64), scenes.render(b, 64))
  assert len({scenes.render(scenes.sample_scene(s), 32).tobytes() for s in range(20)}) == 20
  for kind in ('understanding', 'generation'):
    first = SceneConversations('eval', kind, 50, 32, seed=3)
    again = SceneConversations('eval', kind, 50, 32, seed=3)
    for i in (0, 7, 49):
      r1, r2 = first[i], again[i]
      assert json.dumps(r1['meta']) == json.dumps(r2['meta'])
      assert _texts(r1['messages']) == _texts(r2['messages'])
      images = [[p['image'] for m in r['messages'] for p in m['content']
                 if p['type'] == 'image'] for r in (r1, r2)]
      assert len(images[0]) == 1 and images[0][0].shape == (32, 32, 3)
      assert images[0][0].dtype == np.uint8
      np.testing.assert_array_equal(images[0][0], images[1][0])
  with pytest.raises(IndexError):
    SceneConversations('train', 'understanding', 5)[5]


def test_splits_are_disjoint_seed_ranges():
  (a0, a1), (b0, b1) = scenes.SPLITS['train'], scenes.SPLITS['eval']
  assert a0 < a1 <= b0 < b1
  assert scenes.split_of_seed(scenes.scene_seed('eval', 0)) == 'eval'
  assert scenes.split_of_seed(scenes.scene_seed('train', a1 - a0 - 1)) == 'train'
  train = {SceneConversations('train', 'understanding', 300).example(i)[2]['scene_seed']
           for i in range(300)}
  held = {SceneConversations('eval', 'generation', 300).example(i)[2]['scene_seed']
          for i in range(300)}
  assert len(train) == len(held) == 300 and not train & held
  with pytest.raises(ValueError, match='no split'):
    scenes.sample_scene(b1)
  with pytest.raises(ValueError, match='outside split'):
    scenes.scene_seed('eval', b1 - b0)


def test_held_out_combos_never_in_training_but_in_eval():
  seen = {'train': [], 'eval': []}
  for split, n in (('train', 2000), ('eval', 400)):
    for kind in ('understanding', 'generation'):
      source = SceneConversations(split, kind, n, 16)
      for i in range(n):
        _, messages, meta = source.example(i)
        combos = {(o['colour'], o['shape']) for o in meta['scene']['objects']}
        text = ' '.join(_texts(messages)).lower()
        in_text = any(phrase in text for phrase in _HELD_OUT_TEXT)
        seen[split].append(bool(combos & set(scenes.HELD_OUT_COMBOS)) or in_text)
        if meta['held_out']:
          assert split == 'eval'
  assert not any(seen['train'])
  assert 0.3 < np.mean(seen['eval']) < 0.8
  # The image shows the described scene, so the scan above covers the images too.
  for kind in ('understanding', 'generation'):
    source = SceneConversations('train', kind, 2000, 32)
    for i in (0, 999, 1999):
      record = source[i]
      image = [p['image'] for m in record['messages'] for p in m['content']
               if p['type'] == 'image'][0]
      described = scenes.Scene.from_dict(record['meta']['scene'])
      np.testing.assert_array_equal(image, scenes.render(described, 32))


def test_questions_are_unambiguous_and_answers_follow_from_the_scene():
  source = SceneConversations('train', 'understanding', 600, 16, seed=1)
  types, yes = [], []
  for i in range(600):
    _, messages, meta = source.example(i)
    question, answer = _texts(messages)
    assert meta['answer'] == answer
    objects = meta['scene']['objects']
    types.append(meta['question_type'])
    if meta['question_type'] == 'caption':
      assert question == 'Describe the image.'
      for o in objects:
        assert answer.count(f"a {o['size']} {o['colour']} {o['shape']} ") == 1, answer
      continue
    assert len(answer.split()) == 1
    assert _recompute_answer(question, objects) == answer, (question, objects)
    if meta['question_type'] == 'yes_no':
      yes.append(answer == 'yes')
  counts = {t: types.count(t) for t in scene_conversations.QUESTION_TYPES}
  assert min(counts.values()) >= 0.08 * 600, counts
  assert 0.4 < np.mean(yes) < 0.6


def test_multi_turn_examples_ask_distinct_types_about_one_image():
  single = SceneConversations('train', 'understanding', 40, 16, seed=2)
  multi = SceneConversations('train', 'understanding', 40, 16, seed=2, questions_per_image=4)
  for i in range(40):
    _, messages, meta = multi.example(i)
    assert [m['role'] for m in messages] == ['user', 'assistant'] * 4
    images = [[p for p in m['content'] if p['type'] == 'image'] for m in messages]
    assert len(images[0]) == 1 and not any(images[1:])
    texts = _texts(messages)
    assert texts[1::2] == meta['answers'] and meta['answer'] == meta['answers'][-1]
    for turn, qtype in enumerate(meta['question_types']):
      wanted = scene_conversations.QUESTION_TYPES[(i + 2 + turn) % 6]
      if wanted in ('caption', 'count', 'yes_no'):  # always supported, so always asked
        assert qtype == wanted
    for question, answer, qtype in zip(texts[::2], texts[1::2], meta['question_types']):
      if qtype != 'caption':
        assert _recompute_answer(question, meta['scene']['objects']) == answer
    # The first turn is the one the single-question source asks of the same scene.
    assert single.example(i)[2]['answers'] == meta['answers'][:1]
  with pytest.raises(ValueError, match='questions_per_image'):
    SceneConversations('train', 'understanding', 4, questions_per_image=7)


def test_data_config_mirrors_of_the_scene_sources_agree():
  # mllm_data_config checks these limits without importing the scene modules.
  from unimm_jax.data import mllm_data_config
  assert mllm_data_config._MAX_QUESTIONS_PER_IMAGE == len(scene_conversations.QUESTION_TYPES)
  assert mllm_data_config._SCENE_SPLIT_SIZES == {
      'num_train_examples': scenes.SPLITS['train'][1] - scenes.SPLITS['train'][0],
      'num_eval_examples': scenes.SPLITS['eval'][1] - scenes.SPLITS['eval'][0]}


def _region_name(box):
  return next(k for k, v in scenes.REGIONS.items() if list(v) == box)


def test_generation_prompts_name_their_targets_and_the_check_verifies_them():
  for split in ('train', 'eval'):
    source = SceneConversations(split, 'generation', 150, 64)
    images, checks = [], []
    for i in range(150):
      record = source[i]
      prompt = _texts(record['messages'])[0]
      image = record['messages'][1]['content'][0]['image']
      check = record['meta']['check']
      named = re.findall(r'an? (\w+) (\w+) (?:on|at) the (left|right|top|bottom)', prompt)
      assert prompt.startswith('Draw ') and prompt.endswith('.') and named
      objects = record['meta']['scene']['objects']
      assert len(named) == len(check['targets']) == len(objects)
      for (colour, shape, region), target, obj in zip(named, check['targets'], objects):
        assert (target['colour'], target['shape'], _region_name(target['region'])) == (
            colour, shape, region) == (obj['colour'], obj['shape'], region)
        x0, y0, x1, y1 = target['region']
        e = scenes.EXTENT * scenes.SIZES[obj['size']]
        assert x0 <= obj['cx'] - e and obj['cx'] + e <= x1
        assert y0 <= obj['cy'] - e and obj['cy'] + e <= y1
      images.append(image)
      checks.append(check)
    assert scene_checks.generation_pass_rate(images, checks) == 1.0
    floats = [im.astype(np.float32) / 127.5 - 1.0 for im in images[:20]]
    assert scene_checks.generation_pass_rate(floats, checks[:20]) == 1.0


def test_check_fails_on_wrong_colour_wrong_side_or_empty_images():
  source = SceneConversations('train', 'generation', 120, 64)
  for i in range(120):
    scene, _, meta = source.example(i)
    first, *rest = scene.objects
    used = {o.colour for o in scene.objects}
    other = next(c for c in scenes.COLOURS if c not in used)
    recoloured = dataclasses.replace(
        scene, objects=(dataclasses.replace(first, colour=other), *rest))
    horizontal = _region_name(meta['check']['targets'][0]['region']) in ('left', 'right')
    mirrored = dataclasses.replace(scene, objects=tuple(
        dataclasses.replace(o, cx=1 - o.cx) if horizontal else
        dataclasses.replace(o, cy=1 - o.cy) for o in scene.objects))
    empty = dataclasses.replace(scene, objects=())
    for wrong in (recoloured, mirrored, empty):
      assert not scene_checks.check_generated_image(scenes.render(wrong, 64), meta['check'])
  with pytest.raises(ValueError, match='one check per image'):
    scene_checks.generation_pass_rate([], [])


def test_scene_word_tokenizer_round_trips_every_template_text():
  tok = load_tokenizer('scene_words')
  assert tok.vocab_size < 256 and len(set(tok.tokens)) == tok.vocab_size
  assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}) == 4
  assert tok.eos_ids == (tok.eos_id,)
  templates = [re.sub(r'\{\w+\}', ' ', t) for t in scene_conversations.TEMPLATES.values()]
  texts = list(templates)
  for split, kind in (('train', 'understanding'), ('eval', 'understanding'),
                      ('eval', 'generation')):
    source = SceneConversations(split, kind, 300, 16)
    texts += [t for i in range(300) for t in _texts(source.example(i)[1])]
  for text in texts:
    ids = tok.encode(text)
    assert tok.unk_id not in ids, text
    if text not in templates:
      assert tok.decode(ids) == text
  assert tok.decode(tok.encode('What COLOUR is the circle?')) == 'What colour is the circle?'
  unknown = tok.encode('Is there a zebra? 5 %')
  assert unknown.count(tok.unk_id) == 2 and len(unknown) == 7
  assert tok.decode([10_000, -1, tok.eos_id], skip_special_tokens=False) == '<unk> <unk> <eos>'
  messages = [{'role': 'user', 'content': 'How many objects are there?'},
              {'role': 'assistant', 'content': '3'}]
  chat = tok.render_chat(messages[:1], add_generation_prompt=True)
  assert chat == '<user> How many objects are there? <eos> <assistant>'
  ids = tok.apply_chat_template(messages)
  assert tok.decode(ids) == tok.render_chat(messages) and ids.count(tok.eos_id) == 2
  assert tok.decode(ids, skip_special_tokens=True) == 'How many objects are there? 3'
  document = tok.encode_document('There is one object: a small red circle on the left.')
  assert document[0] == tok.bos_id and document[-1] == tok.eos_id
  with pytest.raises(ValueError, match='role'):
    tok.render_chat([{'role': 'system', 'content': 'hi'}])


def test_answer_accuracy_on_hand_made_cases():
  predictions = ['Red.', 'two', ' The circle ', 'left', 'No', 'blue', 'yes', 'Describe']
  references = ['red', '2', 'circle', 'right', 'no', 'green', 'yes', 'There is one object.']
  types = ['colour', 'count', 'shape', 'left_right', 'yes_no', 'colour', 'yes_no', 'caption']
  held = [True, False, False, True, False, False, True, False]
  out = scene_checks.answer_accuracy(predictions, references, types, held)
  assert out['accuracy/colour'] == 0.5 and out['count/colour'] == 2
  assert out['accuracy/count'] == 1.0 and out['accuracy/shape'] == 1.0
  assert out['accuracy/left_right'] == 0.0 and out['accuracy/yes_no'] == 1.0
  assert out['accuracy/caption'] == 0.0 and 'chance/caption' not in out
  assert out['accuracy/all'] == pytest.approx(5 / 7) and out['count/all'] == 7
  assert out['accuracy/held_out'] == pytest.approx(2 / 3)
  assert out['accuracy/seen'] == pytest.approx(3 / 4)
  assert out['count/held_out'] == 3 and out['count/seen'] == 4
  assert out['chance/held_out'] == pytest.approx((1 / 7 + 0.5 + 0.5) / 3)
  # One question of each type per group: always the type's majority answer is always right.
  assert out['majority/held_out'] == 1.0 and out['majority/seen'] == 1.0
  assert out['chance/colour'] == pytest.approx(1 / 7) and out['chance/count'] == 0.2
  assert out['majority/colour'] == 0.5 and out['majority/yes_no'] == 0.5
  assert out['chance/all'] == pytest.approx((2 / 7 + 0.2 + 0.25 + 0.5 + 1.0) / 7)
  assert scene_checks.normalise_answer('  An ORANGE! ') == 'orange'
  assert scene_checks.normalise_answer('Three.') == '3'
  with pytest.raises(ValueError, match='unknown question type'):
    scene_checks.answer_accuracy(['a'], ['a'], ['colours'])
  with pytest.raises(ValueError, match='one entry per example'):
    scene_checks.answer_accuracy(['a', 'b'], ['a'], ['colour'])


def test_scenes_image_source_through_the_image_pipeline():
  cfg = default_data_config()
  cfg.update(source='scenes', scenes_num_images=8, image_size=32, resize_mode='resize')
  renders = {scenes.render(scenes.sample_scene(scenes.scene_seed('train', i)), 32).tobytes()
             for i in range(8)}
  batches = []
  for _ in range(2):
    it = iter(pipeline.build_train_dataset(cfg, batch_size=4, seed=5))
    batches.append([next(it)['image'] for _ in range(2)])
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a, b)
  for image in np.concatenate(batches[0]):
    assert image.shape == (32, 32, 3) and -1.0 <= image.min() and image.max() <= 1.0
    pixels = np.round((image + 1.0) * 127.5).astype(np.uint8)
    assert pixels.tobytes() in renders or pixels[:, ::-1].tobytes() in renders
  held_out = pipeline.build_eval_images(cfg, 3)
  for i, image in enumerate(held_out):
    expected = scenes.render(scenes.sample_scene(scenes.scene_seed('eval', i)), 32)
    np.testing.assert_allclose(image, expected / 127.5 - 1.0, atol=1e-6)
  assert isinstance(sources.make_source(cfg, 'train'), scenes.SceneImageSource)
  for bad in (0, 10**7):
    cfg.scenes_num_images = bad
    with pytest.raises(ValueError, match='scenes_num_images'):
      validate_data_config(cfg)
