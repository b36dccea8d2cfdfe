"""Tests of the built-in editing data: scene edit chains, their records, vocabulary and the
edit check."""
import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from unimm_jax.data import mllm_data, mllm_data_config, mllm_sequence, scenes
from unimm_jax.data.mllm_data_config import default_mllm_data_config
from unimm_jax.data.mllm_sequence import ImageSlots, SpecialIds
from unimm_jax.data.scene_edits import SceneEdits
from unimm_jax.data.scene_tokenizer import SceneWordTokenizer
from unimm_jax.evals import scene_checks

# Written out here, not taken from the code under test.
_SIZES, _COLOURS = ('small', 'large'), ('red', 'green', 'blue', 'yellow', 'purple', 'orange',
                                        'white')
_HELD_OUT_TEXT = ('red triangle', 'blue circle', 'yellow cross', 'purple square')
_REGIONS = {'left': (0, 0, .5, 1), 'right': (.5, 0, 1, 1), 'top': (0, 0, 1, .5),
            'bottom': (0, .5, 1, 1)}
_WHERE = {'on the left': 'left', 'on the right': 'right', 'at the top': 'top',
          'at the bottom': 'bottom'}
# The scene word tokenizer's 78 tokens before the editing words came: the demos' ids.
_OLD_TOKENS = (
    '<pad>', '<bos>', '<eos>', '<unk>', '<user>', '<assistant>', ',', '.', '0', '1', '2', '3',
    '4', '5', '6', '7', '8', '9', ':', '?', 'Describe', 'Draw', 'How', 'Is', 'There', 'What',
    'a', 'an', 'and', 'are', 'at', 'blue', 'bottom', 'centre', 'circle', 'circles', 'colour',
    'cross', 'crosses', 'eight', 'five', 'four', 'green', 'image', 'in', 'is', 'large', 'left',
    'many', 'nine', 'no', 'object', 'objects', 'of', 'on', 'one', 'or', 'orange', 'purple',
    'red', 'right', 'seven', 'shape', 'six', 'small', 'square', 'squares', 'the', 'there',
    'three', 'top', 'triangle', 'triangles', 'two', 'white', 'yellow', 'yes', 'zero')


def _extent(obj):
  return scenes.EXTENT * {'small': 0.08, 'large': 0.13}[obj['size']]


def _scene_problem(objects, split):
  """Independent validity check of a scene description; None when valid."""
  if not 1 <= len(objects) <= 4:
    return 'count'
  pairs = [(o['colour'], o['shape']) for o in objects]
  if len(set(pairs)) != len(pairs):
    return 'repeated pair'
  if split == 'train' and set(pairs) & set(scenes.HELD_OUT_COMBOS):
    return 'held-out pair in train'
  for i, a in enumerate(objects):
    e = _extent(a)
    if not (e < a['cx'] < 1 - e and e < a['cy'] < 1 - e):
      return 'outside the image'
    for b in objects[i + 1:]:
      # The extent circles keep two margins (0.02 each) apart, less the centres' rounding.
      if np.hypot(a['cx'] - b['cx'], a['cy'] - b['cy']) < e + _extent(b) + 0.04 - 2e-4:
        return 'overlap'
  return None


def _referent(ref, objects):
  """The one object of `objects` that `ref` ('the circle', 'the small circle', 'the red
  object', 'the large red object', 'the red circle') names; asserts it is unique."""
  words = ref.split()
  assert words[0] == 'the', ref
  fields = {}
  for word in words[1:]:
    if word in _SIZES:
      fields['size'] = word
    elif word in _COLOURS:
      fields['colour'] = word
    elif word != 'object':
      fields['shape'] = word
  found = [i for i, o in enumerate(objects) if all(o[k] == v for k, v in fields.items())]
  assert len(found) == 1, (ref, objects)
  return found[0]


def _inside(obj, region):
  x0, y0, x1, y1 = _REGIONS[region]
  e = _extent(obj)
  return x0 <= obj['cx'] - e and obj['cx'] + e <= x1 and y0 <= obj['cy'] - e and (
      obj['cy'] + e <= y1)


def _recompute_kind(instruction, before, after):
  """The edit kind that `instruction` asks for, after asserting that `after` is `before`
  with exactly that change."""
  if m := re.fullmatch(r'Make (the .+) (\w+)\.', instruction):
    i = _referent(m[1], before)
    assert before[i]['colour'] != m[2]
    assert after == before[:i] + [{**before[i], 'colour': m[2]}] + before[i + 1:]
    return 'recolour'
  if m := re.fullmatch(r'Move (the .+) to the (left|right|top|bottom)\.', instruction):
    i = _referent(m[1], before)
    x0, y0, x1, y1 = _REGIONS[m[2]]
    assert not (x0 <= before[i]['cx'] < x1 and y0 <= before[i]['cy'] < y1)  # it moves
    moved = after[i]
    assert {**moved, 'cx': 0, 'cy': 0} == {**before[i], 'cx': 0, 'cy': 0}
    assert _inside(moved, m[2])
    assert after[:i] + after[i + 1:] == before[:i] + before[i + 1:]
    return 'move'
  if m := re.fullmatch(r'Remove (the .+)\.', instruction):
    i = _referent(m[1], before)
    assert after == before[:i] + before[i + 1:]
    return 'remove'
  if m := re.fullmatch(r'Add an? (\w+) (\w+) (on the left|on the right|at the top|at the '
                       r'bottom)\.', instruction):
    assert after[:-1] == before and len(after) == len(before) + 1
    assert (after[-1]['colour'], after[-1]['shape']) == (m[1], m[2])
    assert _inside(after[-1], _WHERE[m[3]])
    return 'add'
  raise AssertionError(f'unexpected instruction {instruction!r}')


def _images(record):
  return [p['image'] for m in record['messages'] for p in m['content'] if p['type'] == 'image']


def test_records_are_deterministic_and_depend_on_the_seed():
  a, b = SceneEdits('eval', 30, 16, seed=3), SceneEdits('eval', 30, 16, seed=3)
  for i in (0, 11, 29):
    r1, r2 = a[i], b[i]
    assert json.dumps(r1['meta']) == json.dumps(r2['meta']) and r1['kind'] == 'editing'
    assert json.dumps([[{k: v for k, v in p.items() if k != 'image'} for p in m['content']]
                       for m in r1['messages']]) == json.dumps(
                           [[{k: v for k, v in p.items() if k != 'image'} for p in m['content']]
                            for m in r2['messages']])
    for x, y in zip(_images(r1), _images(r2), strict=True):
      assert x.shape == (16, 16, 3) and x.dtype == np.uint8
      np.testing.assert_array_equal(x, y)
    # The images show the described scenes, start first.
    for image, scene in zip(_images(r1), r1['meta']['scenes'], strict=True):
      np.testing.assert_array_equal(image, scenes.render(scenes.Scene.from_dict(scene), 16))
  other = SceneEdits('eval', 30, 16, seed=4)
  assert [other.example(i)[2]['instructions'] for i in range(30)] != [
      a.example(i)[2]['instructions'] for i in range(30)]
  # The start scene is the understanding scene of the same index, whatever the seed.
  assert other.example(5)[0][0] == a.example(5)[0][0] == scenes.sample_scene(
      scenes.scene_seed('eval', 5))
  with pytest.raises(IndexError):
    a[30]
  with pytest.raises(ValueError, match='max_edits'):
    SceneEdits('train', 4, max_edits=0)


def test_chains_are_valid_and_every_instruction_matches_its_change():
  lengths, kinds = [], []
  for split in ('train', 'eval'):
    source = SceneEdits(split, 250, 16, seed=1)
    for i in range(250):
      chain, messages, meta = source.example(i)
      n = meta['num_edits']
      lengths.append(n)
      assert 1 <= n <= 3 and len(chain) == len(meta['scenes']) == n + 1
      assert [m['role'] for m in messages] == ['user', 'assistant'] * n
      assert [p['type'] for p in messages[0]['content']] == ['image', 'text']
      assert all([p['type'] for p in m['content']] == ['text'] for m in messages[2::2])
      assert all([p['type'] for p in m['content']] == ['image'] for m in messages[1::2])
      texts = [m['content'][-1]['text'] for m in messages[::2]]
      assert texts == meta['instructions'] and len(meta['checks']) == n
      assert meta['check'] == meta['checks'][-1] and meta['scene_seed'] == scenes.scene_seed(
          split, i)
      described = meta['scenes']
      for scene in described:
        assert _scene_problem(scene['objects'], split) is None, (scene, split)
        # The background stays: same seed, colour and texture in every round.
        assert (scene['seed'], scene['background'], scene['texture']) == (
            described[0]['seed'], described[0]['background'], described[0]['texture'])
      for k in range(n):
        kind = _recompute_kind(texts[k], described[k]['objects'], described[k + 1]['objects'])
        assert kind == meta['edit_kinds'][k]
        kinds.append(kind)
  counts = {n: lengths.count(n) for n in (1, 2, 3)}
  assert min(counts.values()) >= 0.2 * len(lengths), counts
  assert all(kinds.count(k) >= 0.05 * len(kinds) for k in ('recolour', 'move', 'remove', 'add'))
  single = SceneEdits('train', 20, 16, max_edits=1)
  assert all(single.example(i)[2]['num_edits'] == 1 for i in range(20))


def test_held_out_combos_never_in_training_but_in_eval():
  held = {'train': [], 'eval': []}
  for split, n in (('train', 300), ('eval', 120)):
    source = SceneEdits(split, n, 16)
    for i in range(n):
      _, _, meta = source.example(i)
      combos = {(o['colour'], o['shape']) for s in meta['scenes'] for o in s['objects']}
      text = ' '.join(meta['instructions']).lower()
      in_text = any(phrase in text for phrase in _HELD_OUT_TEXT)
      assert meta['held_out'] == bool(combos & set(scenes.HELD_OUT_COMBOS))
      held[split].append(meta['held_out'] or in_text)
  assert not any(held['train'])
  assert 0.3 < np.mean(held['eval']) < 0.9


def test_vocabulary_appends_the_editing_words_and_keeps_every_id():
  plain, edits = SceneWordTokenizer(), SceneWordTokenizer(edits=True)
  assert plain.tokens == _OLD_TOKENS and plain.vocab_size == 78
  assert edits.tokens[:78] == _OLD_TOKENS
  assert edits.tokens[78:] == ('Add', 'Make', 'Move', 'Remove', 'to')
  texts = []
  for split in ('train', 'eval'):
    source = SceneEdits(split, 100, 16)
    texts += [t for i in range(100) for t in source.example(i)[2]['instructions']]
  assert {t.split()[0] for t in texts} == {'Make', 'Move', 'Remove', 'Add'}
  for text in texts:
    ids = edits.encode(text)
    assert edits.unk_id not in ids and edits.decode(ids) == text, text
  assert plain.unk_id in plain.encode(texts[0])  # the demos' tokenizer lacks the verbs


def test_an_editing_record_reads_its_first_image_and_writes_the_others():
  tok = SceneWordTokenizer(edits=True)
  record = next(r for r in map(SceneEdits('train', 20, 8, seed=2).__getitem__, range(20))
                if r['meta']['num_edits'] == 3)
  plain_ids = SpecialIds(pad=0, bos=1, eos=2, boi=83, eoi=84)
  plain = ImageSlots(image_size=8, discrete_side=2, size_unit=8, anyres=None, layout='plain')
  seq = mllm_sequence.encode_conversation(record, tok, plain_ids, plain)
  assert seq.num_images == 4 and seq.meta['kind'] == 'editing'
  # Image 0 (the user's): 4 unsupervised feature slots; images 1-3 (the assistant's):
  # [BOI] 4 supervised code slots [EOI] each.
  cont = seq.continuous_slot[seq.continuous_slot >= 0]
  assert cont.tolist() == [0, 1, 2, 3] and not seq.supervised[seq.continuous_slot >= 0].any()
  disc = seq.discrete_slot >= 0
  assert seq.discrete_slot[disc].tolist() == list(range(4, 16)) and seq.supervised[disc].all()
  assert seq.tokens.tolist().count(83) == 3 and seq.tokens.tolist().count(84) == 3
  np.testing.assert_allclose(seq.images[2], _images(record)[2] / 127.5 - 1.0, atol=1e-6)
  # Every instruction is context, every image the assistant draws a target.
  assert tok.decode(seq.tokens[seq.supervised].tolist()).count('<eos>') == 3
  assert 'Make' not in tok.decode(seq.tokens[seq.supervised].tolist())
  # The rows layout (with the any-res continuous branch): codes supervised only when written.
  rows_ids = SpecialIds(pad=0, bos=1, eos=2, boi=83, eoi=84, sep=85, eor=86, size_base=87,
                        image_offset=100, num_image_codes=16)
  from unimm_jax.data.anyres import AnyRes  # pylint: disable=import-outside-toplevel
  rows = ImageSlots(image_size=8, discrete_side=2, size_unit=8, anyres=AnyRes(8, 2))
  seq = mllm_sequence.encode_conversation(record, tok, rows_ids, rows)
  for j in range(4):
    codes = seq.supervised[(seq.discrete_slot >= 4 * j) & (seq.discrete_slot < 4 * j + 4)]
    assert len(codes) == 4 and (codes.all() if j else not codes.any())
  assert not seq.supervised[seq.continuous_slot >= 0].any()  # features are never targets
  # Prompting the last round: the earlier rounds' images in context, then [BOI].
  prompt = mllm_sequence.encode_conversation(record, tok, plain_ids, plain,
                                             generation_prompt='image')
  assert prompt.num_images == 3 and prompt.tokens[-1] == 83
  assert mllm_data.prompt_text(record) == record['meta']['instructions'][-1]


def test_edit_check_passes_true_edits_and_fails_the_unedited_image():
  edited, unedited, checks = [], [], []
  for split in ('train', 'eval'):
    source = SceneEdits(split, 40, 32, seed=5)
    for i in range(40):
      record = source[i]
      images = _images(record)
      for k, check in enumerate(record['meta']['checks']):
        edited.append(images[k + 1])
        unedited.append(images[k])
        checks.append(check)
        # The generation check of the same round passes too (its targets and min_fraction).
        assert scene_checks.check_generated_image(images[k + 1], check)
  assert scene_checks.edit_pass_rate(edited, checks) == 1.0
  assert scene_checks.edit_pass_rate(unedited, checks) == 0.0
  floats = [im.astype(np.float32) / 127.5 - 1.0 for im in edited[:10]]
  assert scene_checks.edit_pass_rate(floats, checks[:10]) == 1.0
  with pytest.raises(ValueError, match='one check per image'):
    scene_checks.edit_pass_rate(edited, [])


def test_edit_check_fails_wrong_edits():
  source = SceneEdits('train', 60, 32, seed=6)
  tried = 0
  for i in range(60):
    chain, _, meta = source.example(i)
    for k, kind in enumerate(meta['edit_kinds']):
      after, check = chain[k + 1], meta['checks'][k]
      if kind in ('recolour', 'move', 'add') and len(after.objects) > 1:
        # Only the edited object drawn: the others are lost.
        target = next(o for o in after.objects if o not in chain[k].objects)
        alone = dataclasses.replace(after, objects=(target,))
        assert not scene_checks.check_edited_image(scenes.render(alone, 32), check)
        tried += 1
      if kind == 'recolour':  # another colour than the one asked
        index = next(j for j, o in enumerate(after.objects) if o not in chain[k].objects)
        target = after.objects[index]
        other = next(c for c in scenes.COLOURS if c not in (
            target.colour, chain[k].objects[index].colour))
        wrong = dataclasses.replace(after, objects=after.objects[:index] + (
            dataclasses.replace(target, colour=other),) + after.objects[index + 1:])
        assert not scene_checks.check_edited_image(scenes.render(wrong, 32), check)
  assert tried > 10


def _editing_config(**overrides):
  cfg = default_mllm_data_config()
  cfg.update({'seq_len': 96, 'images_per_row': 4, 'image_size': 8, 'shuffle_seed': 1,
              'num_train_examples': 50, 'num_eval_examples': 6, **overrides})
  return cfg


def test_editing_in_the_mixture_and_the_eval_records():
  assert mllm_data.mixture_weights(default_mllm_data_config()) == {
      'understanding': 1.0, 'generation': 1.0}  # editing is off by default
  assert tuple(mllm_data_config.KIND_WEIGHT_FIELDS) == mllm_sequence.KINDS
  cfg = _editing_config(editing_weight=2.0)
  assert mllm_data.mixture_weights(cfg) == {'understanding': 1.0, 'generation': 1.0,
                                            'editing': 2.0}
  sources = mllm_data.make_conversation_sources(cfg, 'train')
  assert isinstance(sources['editing'], SceneEdits) and sources['editing'].max_edits == 3
  tok = SceneWordTokenizer(edits=True)
  ids = SpecialIds(pad=0, bos=1, eos=2, boi=83, eoi=84)
  slots = ImageSlots(image_size=8, discrete_side=2, size_unit=8, anyres=None, layout='plain')
  it = iter(mllm_data.build_mllm_train_dataset(cfg, tok, ids, slots, batch_size=2))
  tokens = np.concatenate([next(it)['tokens'] for _ in range(6)])
  verbs = [tok.ids[w] for w in ('Make', 'Move', 'Remove', 'Add')]
  questions = [tok.ids[w] for w in ('Describe', 'What', 'How', 'Is')]
  for first_words in (verbs, questions, [tok.ids['Draw']]):  # the three kinds mixed
    assert np.isin(tokens, first_words).any()
  records = mllm_data.eval_records(cfg, 'editing', 6)
  assert all(r['kind'] == 'editing' and r['meta']['checks'] for r in records)
  assert records[0]['meta']['split'] == 'eval'
  batches = list(mllm_data.build_mllm_eval_batches(cfg, tok, ids, slots, batch_size=4))
  seen = np.concatenate([b['tokens'] for b in batches])
  assert np.isin(seen, verbs).any()
  # Editing alone is a valid mixture; too few images per row for max_edits is refused.
  only = _editing_config(understanding_weight=0.0, generation_weight=0.0, editing_weight=1.0)
  assert list(mllm_data.make_conversation_sources(only, 'train', ('editing',))) == ['editing']
  with pytest.raises(ValueError, match='images_per_row=3 cannot hold'):
    mllm_data.make_conversation_sources(_editing_config(editing_weight=1.0, images_per_row=3),
                                        'train')


def test_jsonl_editing_records(tmp_path):
  record = SceneEdits('train', 1, 16)[0]
  for j, image in enumerate(_images(record)):
    Image.fromarray(image).save(tmp_path / f'{j}.png')
  j = 0
  for message in record['messages']:
    for part in message['content']:
      if part['type'] == 'image':
        del part['image']
        part['path'] = f'{j}.png'
        j += 1
  (tmp_path / 'edits.jsonl').write_text('\n'.join([json.dumps(record)] * 3) + '\n')
  cfg = _editing_config(source='jsonl', path=str(tmp_path / 'edits.jsonl'),
                        understanding_weight=0.0, generation_weight=0.0, editing_weight=1.0)
  source = mllm_data.make_conversation_sources(cfg, 'train', ('editing',))['editing']
  assert len(source) == 2  # line 0 held out for eval
  read = source[0]
  assert read['kind'] == 'editing' and read['meta'] == record['meta']
  tok = SceneWordTokenizer(edits=True)
  seq = mllm_sequence.encode_conversation(
      read, tok, SpecialIds(pad=0, bos=1, eos=2, boi=83, eoi=84),
      ImageSlots(image_size=8, discrete_side=2, size_unit=8, anyres=None, layout='plain'))
  assert seq.num_images == len(_images(SceneEdits('train', 1, 16)[0]))
