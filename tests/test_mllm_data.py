"""Tests of the MLLM data: any-res tiling, sequence layout, packing, Grain iterators."""
import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from unimm_jax import config_defaults
from unimm_jax.data import anyres, mllm_data, mllm_sequence, text_tokenizer
from unimm_jax.data.mllm_data_config import default_mllm_data_config, validate_mllm_data_config
from unimm_jax.data.mllm_sequence import ImageSlots, SpecialIds
from unimm_jax.data.transforms import Unreadable

PAPER_PINPOINTS = ((384, 768), (768, 384), (768, 768), (384, 1152), (1152, 384))


class WordTokenizer:
  """Whole words from a fixed list; `<...>` entries are special (decode skips them)."""

  WORDS = ('<pad>', '<user>', '<assistant>', 'What?', 'red', '<bos>', '<eos>', 'Draw.', 'blue',
           'word')
  vocab_size, pad_id, bos_id, eos_id, eos_ids = 10, 0, 5, 6, (6,)

  def encode(self, text):
    return [self.WORDS.index(w) for w in text.split()]

  def decode(self, ids, skip_special_tokens=False):
    words = [self.WORDS[i] for i in ids]
    return ' '.join(w for w in words if not (skip_special_tokens and w.startswith('<')))


# Tiny layout: 8-px images, 2 x 2 codes, size unit 4 (size token 24 + 2); ViT tiles of 6 px
# with 3 x 3 tokens (T = 9), grids 1 x 2 or 2 x 1 tiles (max_tiles 2, F = 27).
IDS = SpecialIds(pad=0, bos=5, eos=6, boi=20, eoi=21, sep=22, eor=23, size_base=24,
                 image_offset=10, num_image_codes=4)
SLOTS = ImageSlots(image_size=8, discrete_side=2, size_unit=4,
                   anyres=anyres.AnyRes(tile_size=6, tokens_per_side=3,
                                        grid_pinpoints=((6, 12), (12, 6))))
F = 27


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _understanding(image, answer='red'):
  return {'kind': 'understanding', 'meta': {'answer': answer},
          'messages': [{'role': 'user', 'content': [{'type': 'image', 'image': image},
                                                    {'type': 'text', 'text': 'What?'}]},
                       {'role': 'assistant', 'content': [{'type': 'text', 'text': answer}]}]}


def _generation(image, prompt='Draw.'):
  return {'kind': 'generation', 'meta': {},
          'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': prompt}]},
                       {'role': 'assistant', 'content': [{'type': 'image', 'image': image}]}]}


def _encode(record, **kwargs):
  return mllm_sequence.encode_conversation(record, WordTokenizer(), IDS, SLOTS, **kwargs)


# ---- any-res ---------------------------------------------------------------------------

def test_select_best_resolution_hand_cases():
  assert anyres.select_best_resolution((1000, 500), PAPER_PINPOINTS) == (768, 384)
  assert anyres.select_best_resolution((500, 1000), PAPER_PINPOINTS) == (384, 768)
  assert anyres.select_best_resolution((500, 500), PAPER_PINPOINTS) == (768, 768)
  assert anyres.select_best_resolution((3000, 1000), PAPER_PINPOINTS) == (1152, 384)
  # Tiny images tie on effective resolution (their own area); least waste wins.
  assert anyres.select_best_resolution((100, 100), PAPER_PINPOINTS) == (384, 768)


def _authors_unpad_slots(w, h, config):
  """The authors' feature arrangement, re-derived on index arrays: tiles viewed as
  (R, C, s, s), permuted to an (R s, C s) plane, unpadded with unpad_image's arithmetic,
  an EOR (-1) column appended, flattened, the base tokens in front."""
  s, t = config.tokens_per_side, config.tokens_per_tile
  pw, ph = anyres.select_best_resolution((w, h), config.grid_pinpoints)
  rows, cols = ph // config.tile_size, pw // config.tile_size
  features = np.arange(t, (1 + rows * cols) * t).reshape(rows, cols, s, s)
  plane = features.transpose(0, 2, 1, 3).reshape(rows * s, cols * s)
  ch, cw = plane.shape
  if w / h > cw / ch:
    padding = (ch - int(h * (cw / w))) // 2
    plane = plane[padding:ch - padding, :]
  else:
    padding = (cw - int(w * (ch / h))) // 2
    plane = plane[:, padding:cw - padding]
  plane = np.concatenate([plane, np.full((plane.shape[0], 1), -1)], axis=1)
  return list(range(t)) + plane.reshape(-1).tolist(), plane.shape[0]


@pytest.mark.parametrize('config', [
    anyres.AnyRes(384, 27, PAPER_PINPOINTS), SLOTS.anyres,
    anyres.AnyRes(16, 2, ((16, 32), (32, 16), (32, 32)))])
def test_unpad_and_slots_match_the_authors_arithmetic(config):
  rng = np.random.default_rng(0)
  sizes = [(1000, 500), (500, 1000), (640, 480), (333, 777), (1, 50), (50, 1)]
  sizes += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(60)]
  rows_cut = 0
  for w, h in sizes:
    want, kept_rows = _authors_unpad_slots(w, h, config)
    assert anyres.continuous_slots((w, h), config) == want, (w, h)
    r, c = anyres.grid_shape((w, h), config)
    kept_r, kept_c = anyres.unpadded_grid((w, h), r, c, config.tokens_per_side)
    assert len(kept_r) == kept_rows and len(want) == config.tokens_per_tile + len(kept_r) * (
        len(kept_c) + 1)
    rows_cut += len(kept_r) < r * config.tokens_per_side
  assert rows_cut > 0  # the sizes exercise the cutting branch
  # 27 x 15 on a 9 x 9 plane: int(15 * 9 / 27) = 5 rows, padding (9 - 5) // 2 = 2. At
  # 27 x 12 the image has int(4.0) = 4 rows; the odd leftover keeps one row more.
  assert anyres.unpadded_grid((27, 15), 1, 1, 9) == (range(2, 7), range(0, 9))
  assert anyres.unpadded_grid((27, 12), 1, 1, 9) == (range(2, 7), range(0, 9))
  assert anyres.unpadded_grid((10, 27), 1, 1, 9) == (range(0, 9), range(3, 6))


def test_resize_and_pad_and_vit_tiles():
  image = np.full((6, 24, 3), 200, np.uint8)  # 24 x 6 -> pinpoint (12, 6), grid 1 x 2
  padded = anyres.resize_and_pad(image, (12, 6))
  assert padded.shape == (6, 12, 3)
  # Width fills (scale 0.5), height ceil(6 * 0.5) = 3 centred: rows 1..3 hold the image.
  assert (padded[1:4] == 200).all() and (padded[0] == 0).all() and (padded[4:] == 0).all()
  tiles = anyres.vit_tiles(image, SLOTS.anyres)
  assert tiles.shape == (3, 6, 6, 3) and tiles.dtype == np.float32
  np.testing.assert_allclose(tiles[0], 200 / 127.5 - 1, atol=1e-6)  # base: a flat image
  np.testing.assert_allclose(tiles[1], padded[:, :6] / 127.5 - 1, atol=1e-6)
  np.testing.assert_allclose(tiles[2], padded[:, 6:] / 127.5 - 1, atol=1e-6)
  tall = anyres.vit_tiles(_image(20, 8), SLOTS.anyres)  # 2 x 1 grid: tiles 1, 2 row-major
  np.testing.assert_allclose(tall[1:].reshape(12, 6, 3),
                             anyres.resize_and_pad(_image(20, 8), (6, 12)) / 127.5 - 1,
                             atol=1e-6)
  base_only = anyres.vit_tiles(image, anyres.AnyRes(6, 3))
  assert base_only.shape == (1, 6, 6, 3)
  assert anyres.continuous_slots((24, 6), anyres.AnyRes(6, 3)) == list(range(9)) + [-1]


# ---- sequences ---------------------------------------------------------------------------

# An image span of the 24 x 6 image: grid 1 x 2, the 3 x 6 token plane unpadded to row 1.
SPAN_UND = ([20, 26, 26, 0, 0, 23, 0, 0, 23, 22] + [0] * 9 + [0] * 6 + [23] + [21])
CONT_UND = list(range(9)) + [12, 13, 14, 21, 22, 23, -1]


def test_understanding_layout_by_hand():
  seq = _encode(_understanding(_image(6, 24)))
  want = [5, 1] + SPAN_UND + [3, 6, 2, 4, 6]
  assert seq.tokens.tolist() == want
  sup = [False] * len(want)
  sup[2 + 9] = True  # SEP, always
  sup[-2:] = [True, True]  # the answer and its end of turn
  assert seq.supervised.tolist() == sup
  discrete = [-1] * len(want)
  discrete[5:7], discrete[8:10] = [0, 1], [2, 3]
  assert seq.discrete_slot.tolist() == discrete
  continuous = [-1] * len(want)
  continuous[12:28] = CONT_UND
  assert seq.continuous_slot.tolist() == continuous
  assert seq.images.shape == (1, 8, 8, 3) and seq.vit_tiles.shape == (1, 3, 6, 6, 3)
  assert seq.meta == {'answer': 'red', 'kind': 'understanding', 'image_wh': [[24, 6]]}


def test_multi_turn_layout_supervises_every_answer():
  record = _understanding(_image(6, 24))
  record['messages'] += [{'role': 'user', 'content': [{'type': 'text', 'text': 'What?'}]},
                         {'role': 'assistant', 'content': [{'type': 'text', 'text': 'blue'}]}]
  seq = _encode(record)
  want = [5, 1] + SPAN_UND + [3, 6, 2, 4, 6, 1, 3, 6, 2, 8, 6]
  assert seq.tokens.tolist() == want
  sup = [False] * len(want)
  sup[2 + 9] = True  # SEP
  sup[-8:-6] = sup[-2:] = [True, True]  # each answer and its end of turn
  assert seq.supervised.tolist() == sup
  assert seq.images.shape == (1, 8, 8, 3)  # the image once, in the first turn
  # Prompting for an answer keeps the earlier turns and leaves the last answer out.
  prompt = _encode(record, generation_prompt='answer')
  assert prompt.tokens.tolist() == want[:-3] + [2]


def test_generation_layout_by_hand():
  # An 8 x 8 image ties (6, 12) and (12, 6); the first wins: grid 2 x 1, plane 6 x 3,
  # new height int(8 * 3 / 8) = 3, padding (6 - 3) // 2 = 1: token rows 1..4 kept.
  seq = _encode(_generation(_image(8, 8)))
  cont = list(range(9)) + [12, 13, 14, -1, 15, 16, 17, -1, 18, 19, 20, -1, 21, 22, 23, -1]
  span = [20, 26, 26, 0, 0, 23, 0, 0, 23, 22] + [23 if c < 0 else 0 for c in cont] + [21]
  want = [5, 1, 7, 6, 2] + span + [6]
  assert seq.tokens.tolist() == want
  sup = [False] * 5 + [True] * 10 + [False] * len(cont) + [True, True]
  assert seq.supervised.tolist() == sup
  assert seq.continuous_slot.tolist() == [-1] * 15 + cont + [-1, -1]
  assert seq.discrete_slot.tolist()[5:15] == [-1, -1, -1, 0, 1, -1, 2, 3, -1, -1]


def test_discrete_pixels_are_the_central_square():
  image = np.zeros((8, 24, 3), np.uint8)
  image[:, 8:16] = 255  # the central 8 x 8 square is white, the sides black
  seq = _encode(_understanding(image))
  np.testing.assert_array_equal(seq.images[0], np.ones((8, 8, 3), np.float32))


def test_generation_prompts_and_unconditional():
  record = _understanding(_image(6, 24))
  answer = _encode(record, generation_prompt='answer')
  assert answer.tokens.tolist() == [5, 1] + SPAN_UND + [3, 6, 2]
  image = _encode(_generation(_image(8, 8)), generation_prompt='image')
  assert image.tokens.tolist() == [5, 1, 7, 6, 2, 20] and image.num_images == 0
  assert image.images.shape == (0, 8, 8, 3) and image.vit_tiles.shape == (0, 3, 6, 6, 3)
  blank = mllm_sequence.unconditional_image_prompt(IDS, SLOTS)
  assert blank.tokens.tolist() == [20] and blank.images.shape == (0, 8, 8, 3)


def test_unreadable_image_and_malformed_record(tmp_path):
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  record = _understanding(None)
  record['messages'][0]['content'][0] = {'type': 'image', 'path': 'bad.png'}
  result = _encode(record, image_root=str(tmp_path))
  assert isinstance(result, Unreadable) and 'bad.png' in result.reason
  record['messages'][0]['content'][0] = {'type': 'image', 'path': 'missing.png'}
  assert isinstance(_encode(record, image_root=str(tmp_path)), Unreadable)
  with pytest.raises(ValueError, match='role'):
    _encode({'kind': 'understanding', 'messages': [{'role': 'bot', 'content': []}]})


def test_special_id_collisions_are_named():
  byte = text_tokenizer.ByteTokenizer()  # 0..255 bytes, 256..260 specials
  ok = SpecialIds(pad=256, bos=257, eos=258, boi=261, eoi=262, sep=263, eor=264, size_base=265,
                  image_offset=300, num_image_codes=16)
  ok.check(byte, SLOTS)
  IDS.check(WordTokenizer(), SLOTS)
  bad = {'image codes 4..19 include 4': dict(image_offset=4),
         'boi 256 include 256, the text tokenizer .* pad id': dict(pad=0, boi=256),
         'eos_ids': dict(eoi=260), "'\\\\n'": dict(eor=10), 'overlap': dict(sep=300),
         'size token 260': dict(size_base=258), 'pad 300 is one of': dict(pad=300)}
  for match, change in bad.items():
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(ok, **change).check(byte, SLOTS)


def test_collate_prompts_left_pads():
  long = _encode(_understanding(_image(6, 24)), generation_prompt='answer')
  short = _encode(_generation(_image(8, 8)), generation_prompt='image')
  batch = mllm_sequence.collate_prompts([short, long], images_per_row=2, pad_id=0)
  n = len(long)
  assert batch['tokens'].shape == (2, n) and batch['images'].shape == (2, 2, 8, 8, 3)
  assert batch['vit_tiles'].shape == (2, 2, 3, 6, 6, 3)
  assert batch['tokens'][0].tolist() == [0] * (n - 6) + [5, 1, 7, 6, 2, 20]
  assert batch['attention_mask'][0].tolist() == [False] * (n - 6) + [True] * 6
  assert batch['positions'][0].tolist() == [0] * (n - 6) + list(range(6))
  assert batch['attention_mask'][1].all() and batch['segment_ids'][1].tolist() == [1] * n
  np.testing.assert_array_equal(batch['continuous_index'][1], long.continuous_slot)
  np.testing.assert_array_equal(batch['images'][1, 0], long.images[0])
  assert not batch['images'][0].any() and not batch['images'][1, 1].any()
  with pytest.raises(ValueError, match='more than images_per_row'):
    mllm_sequence.collate_prompts([long], images_per_row=0)


# ---- packing -------------------------------------------------------------------------------

def _pack(seqs, seq_len, images_per_row=2):
  import grain  # pylint: disable=import-outside-toplevel
  from unimm_jax.data.text_packing import PackedIterDataset  # pylint: disable=import-outside-toplevel
  layout = mllm_data.MultimodalRows(seq_len, images_per_row, SLOTS, IDS.pad)
  ds = grain.MapDataset.source(seqs).to_iter_dataset()
  return list(PackedIterDataset(ds, layout, len(seqs) + 2))


def test_packing_two_examples_offsets_and_loss_mask():
  a, b = _encode(_understanding(_image(6, 24))), _encode(_generation(_image(8, 8)))
  row, = _pack([a, b], len(a) + len(b) + 3)
  n = len(a)
  assert row['segment_ids'].tolist() == [1] * n + [2] * len(b) + [0] * 3
  assert row['positions'][n:n + len(b)].tolist() == list(range(len(b)))
  want_mask = np.concatenate([a.supervised[1:], [False], b.supervised[1:], [False], [0] * 3])
  np.testing.assert_array_equal(row['loss_mask'], want_mask.astype(np.float32))
  assert row['loss_mask'][n - 3] == 1  # '<assistant>' predicts the supervised 'red'
  assert row['loss_mask'][n - 1] == 0 and row['loss_mask'][-4] == 0  # segment ends
  d, c = row['discrete_index'], row['continuous_index']
  np.testing.assert_array_equal(d[:n], a.discrete_slot)
  np.testing.assert_array_equal(d[n:n + len(b)], np.where(b.discrete_slot >= 0,
                                                          b.discrete_slot + 4, -1))
  np.testing.assert_array_equal(c[n:n + len(b)], np.where(b.continuous_slot >= 0,
                                                          b.continuous_slot + F, -1))
  assert sorted(d[d >= 0].tolist()) == list(range(8)) and c.max() == F + 23
  np.testing.assert_array_equal(row['images'][1], b.images[0])
  np.testing.assert_array_equal(row['vit_tiles'][0], a.vit_tiles[0])
  assert row['skipped'] == 0 and set(row) == {
      'tokens', 'positions', 'segment_ids', 'loss_mask', 'discrete_index', 'continuous_index',
      'images', 'vit_tiles', 'skipped'}


def test_packing_drops_too_long_and_closes_full_rows():
  a = _encode(_understanding(_image(6, 24)))
  long = _encode(_understanding(_image(6, 24), answer=' '.join(['word'] * 40)))
  rows = _pack([a, long, a, a], seq_len=len(a) + 5, images_per_row=1)
  # The long one is dropped (not cut), counted in the row being filled when it came.
  assert [r['skipped'].item() for r in rows] == [1, 0, 0]
  assert all((r['segment_ids'] == 1).sum() == len(a) for r in rows)
  rows = _pack([a, a], seq_len=3 * len(a), images_per_row=1)  # images, not tokens, close
  assert len(rows) == 2


# ---- pipelines -------------------------------------------------------------------------------

class ListSource:
  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def _sources():
  rng = np.random.default_rng(1)
  sizes = [(6, 24), (8, 8), (20, 8), (12, 12), (9, 30)]
  und = [_understanding(_image(*sizes[i % 5], seed=i), answer=['red', 'blue'][i % 2])
         for i in range(23)]
  und[5] = Unreadable('a record that could not be read')
  und[7] = _understanding(_image(6, 24), answer=' '.join(['word'] * 90))  # too long
  gen = [_generation(_image(*sizes[int(rng.integers(5))], seed=100 + i)) for i in range(11)]
  return {'understanding': ListSource(und), 'generation': ListSource(gen)}


def _config(**overrides):
  cfg = default_mllm_data_config()
  cfg.update({'seq_len': 96, 'images_per_row': 2, 'shuffle_seed': 3, **overrides})
  return cfg


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_train_resume_and_host_slicing():
  sources = _sources()
  build = lambda **kw: mllm_data.build_mllm_train_dataset(  # pylint: disable=unnecessary-lambda-assignment
      _config(), WordTokenizer(), IDS, SLOTS, sources=sources, **kw)
  it = iter(build(batch_size=4))
  first = _batches(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what Orbax writes
  rest = _batches(it, 3)
  resumed = iter(build(batch_size=4))
  resumed.set_state(state)
  for want, got in zip(rest, _batches(resumed, 3)):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  host0 = _batches(iter(build(batch_size=2, shard_index=0, shard_count=2)), 6)
  host1 = _batches(iter(build(batch_size=2, shard_index=1, shard_count=2)), 6)
  for one, h0, h1 in zip(first + rest, host0, host1):
    for key in one:
      np.testing.assert_array_equal(one[key], np.concatenate([h0[key], h1[key]]), err_msg=key)
  batches = first + rest
  assert batches[0]['tokens'].shape == (4, 96) and batches[0]['images'].shape == (4, 2, 8, 8, 3)
  assert batches[0]['vit_tiles'].shape == (4, 2, 3, 6, 6, 3)
  assert sum(int(b['skipped'].sum()) for b in batches) > 0  # the bad and the too long
  kinds = np.concatenate([b['tokens'][:, 1:] for b in batches])
  assert (kinds == 7).any() and (kinds == 3).any()  # both kinds ('Draw.', 'What?') mixed


def test_unconditional_sequence_is_the_guidance_streams_view():
  """A text-to-image sequence from [BOI] on, [BOI] unsupervised: its prefix is what the
  unconditional stream is given at sampling; a sequence with an image before the
  generated one has no such view."""
  seq = _encode(_generation(_image(8, 8)))
  uncond = mllm_sequence.unconditional_sequence(seq, IDS)
  start = seq.tokens.tolist().index(IDS.boi)
  assert uncond.tokens.tolist() == seq.tokens.tolist()[start:]
  assert uncond.tokens[:1].tolist() == mllm_sequence.unconditional_image_prompt(IDS).tokens.tolist()
  assert uncond.supervised.tolist() == [False] + seq.supervised.tolist()[start + 1:]
  assert uncond.discrete_slot.tolist() == seq.discrete_slot.tolist()[start:]
  np.testing.assert_array_equal(uncond.images, seq.images)
  assert uncond.meta['unconditional'] and uncond.meta['kind'] == 'generation'
  assert mllm_sequence.unconditional_sequence(_encode(_understanding(_image(6, 24))), IDS) is None


def test_cfg_dropout_drops_prompts_at_its_rate_and_replays():
  """With cfg_dropout p, about p of the generation records train as the unconditional
  stream, every other record is encoded as without dropout, and the stream is a function
  of the seed (a rebuilt pipeline gives the same rows)."""
  sources = _sources()
  build = lambda p: mllm_data.build_mllm_train_dataset(  # pylint: disable=unnecessary-lambda-assignment
      _config(cfg_dropout=p), WordTokenizer(), IDS, SLOTS, sources=sources, batch_size=4)
  rows = _batches(iter(build(0.5)), 12)
  again = _batches(iter(build(0.5)), 12)
  for one, two in zip(rows, again):
    np.testing.assert_array_equal(one['tokens'], two['tokens'])
  plain = _batches(iter(build(0.0)), 12)
  tokens = np.concatenate([b['tokens'] for b in rows])
  segments = np.concatenate([b['segment_ids'] for b in rows])
  starts = [(r, c) for r in range(len(tokens)) for c in range(tokens.shape[1])
            if segments[r, c] and (c == 0 or segments[r, c - 1] != segments[r, c])]
  first = [int(tokens[r, c]) for r, c in starts]
  dropped, prompted = first.count(IDS.boi), first.count(IDS.bos)
  generation = sum(1 for r, c in starts if tokens[r, c] == IDS.boi or
                   (tokens[r, c] == IDS.bos and tokens[r, c + 2] == 7))  # 'Draw.'
  assert 0 < dropped < generation and prompted > 0
  plain_tokens = np.concatenate([b['tokens'] for b in plain])
  assert not (plain_tokens[:, 0] == IDS.boi).any()
  with pytest.raises(ValueError, match='cfg_dropout'):
    validate_mllm_data_config(_config(cfg_dropout=1.0))


def test_cfg_dropout_empties_edit_instructions_one_by_one():
  record = {'kind': 'editing', 'meta': {},
            'messages': [{'role': 'user', 'content': [{'type': 'image', 'image': _image(8, 8)},
                                                      {'type': 'text', 'text': 'red'}]},
                         {'role': 'assistant', 'content': [{'type': 'image',
                                                            'image': _image(8, 8, 1)}]},
                         {'role': 'user', 'content': [{'type': 'text', 'text': 'blue'}]},
                         {'role': 'assistant', 'content': [{'type': 'image',
                                                            'image': _image(8, 8, 2)}]}]}
  encode = mllm_data._EncodeDroppingConditions(WordTokenizer(), IDS, SLOTS, 'plain', 0.5)  # pylint: disable=protected-access
  seen = set()
  for seed in range(40):
    seq = encode(record, np.random.default_rng(seed))
    words = seq.tokens.tolist()
    seen.add((4 in words, 8 in words))  # 'red', 'blue'
    assert seq.num_images == 3
  assert seen == {(True, True), (True, False), (False, True), (False, False)}


def test_mixture_is_exact_per_block_and_seeded():
  import grain  # pylint: disable=import-outside-toplevel
  parents = [grain.MapDataset.source(['u']).repeat(None), grain.MapDataset.source(['g']).repeat(None)]
  mix = mllm_data._KindMixture(parents, [3.0, 1.0], seed=0)  # pylint: disable=protected-access
  block = [mix[i] for i in range(1000)]
  assert block.count('u') == 750
  assert block[:40] != [mix[i] for i in range(1000, 1040)]  # blocks are shuffled apart
  again = mllm_data._KindMixture(parents, [3.0, 1.0], seed=0)  # pylint: disable=protected-access
  assert [again[i] for i in range(1000)] == block
  with pytest.raises(ValueError, match='under 1/1000'):
    mllm_data._KindMixture(parents, [1.0, 1e-5], seed=0)  # pylint: disable=protected-access


def _png(path, h, w):
  Image.fromarray(_image(h, w)).save(path)


def test_jsonl_source_skips_and_counts_bad_lines(tmp_path):
  (tmp_path / 'img').mkdir()
  _png(tmp_path / 'img' / 'a.png', 6, 24)
  (tmp_path / 'img' / 'broken.png').write_bytes(b'\x89PNG broken')
  def line(path, kind='understanding'):
    return json.dumps({'kind': kind, 'messages': [
        {'role': 'user', 'content': [{'type': 'image', 'path': path},
                                     {'type': 'text', 'text': 'What?'}]},
        {'role': 'assistant', 'content': [{'type': 'text', 'text': 'red'}]}]})
  lines = [line('img/a.png'), '{not json', line('img/broken.png'), line('img/none.png'),
           json.dumps({'kind': 'understanding', 'messages': 'oops'})]
  (tmp_path / 'data.jsonl').write_text('\n'.join(lines * 3) + '\n')
  cfg = _config(source='jsonl', path=str(tmp_path / '*.jsonl'), generation_weight=0.0,
                shuffle_seed=0)
  validate_mllm_data_config(cfg)
  source = mllm_data.make_conversation_sources(cfg, 'train', ('understanding',))['understanding']
  assert len(source) == 14  # 15 lines, every 50th (line 0) held out
  unreadable = [r.reason for r in map(source.__getitem__, range(len(source)))
                if isinstance(r, Unreadable)]
  assert any('line 2' in r for r in unreadable) and any('"messages"' in r for r in unreadable)
  it = iter(mllm_data.build_mllm_train_dataset(cfg, WordTokenizer(), IDS, SLOTS, batch_size=2))
  batches = _batches(it, 4)
  assert all(int(b['segment_ids'].max(axis=1).min()) > 0 for b in batches)
  assert sum(int(b['skipped'].sum()) for b in batches) > 0
  # One pass over all 15 lines: 3 good (a.png), 12 bad (bad JSON, broken PNG, missing PNG,
  # malformed messages, 3 times each), every one counted.
  cfg.eval_path = str(tmp_path / 'data.jsonl')
  batches = list(mllm_data.build_mllm_eval_batches(cfg, WordTokenizer(), IDS, SLOTS,
                                                   batch_size=2))
  assert sum(int(b['segment_ids'].max(axis=1).sum()) for b in batches) == 3
  assert sum(int(b['skipped'].sum()) for b in batches) == 12


def test_scenes_eval_batches_and_records():
  pytest.importorskip('unimm_jax.data.scene_conversations')
  cfg = _config(num_eval_examples=6, image_size=16, seq_len=160)
  tokenizer = text_tokenizer.load_tokenizer('byte')
  ids = SpecialIds(pad=256, bos=257, eos=258, boi=261, eoi=262, sep=263, eor=264,
                   size_base=265, image_offset=300, num_image_codes=16)
  batches = list(mllm_data.build_mllm_eval_batches(cfg, tokenizer, ids, SLOTS, batch_size=4))
  assert all(b['tokens'].shape == (4, 160) for b in batches)
  assert sum(int(b['skipped'].sum()) for b in batches) + sum(
      int(b['segment_ids'].max(axis=1).sum()) for b in batches) == 12
  questions = mllm_data.eval_records(cfg, 'understanding', 3)
  assert len(questions) == 3 and all(q['meta']['answer'] for q in questions)
  # questions_per_image makes train understanding examples multi-turn; eval asks one each.
  cfg.questions_per_image = 3
  turns = {split: mllm_data.make_conversation_sources(cfg, split, ('understanding',))[
      'understanding'][0]['messages'] for split in ('train', 'eval')}
  assert [len(m) for m in turns.values()] == [6, 2]
  assert ([mllm_data.prompt_text(q) for q in mllm_data.eval_records(cfg, 'understanding', 3)]
          == [mllm_data.prompt_text(q) for q in questions])
  assert mllm_data.prompt_text(mllm_data.eval_records(cfg, 'generation', 1)[0])
  with pytest.raises(ValueError, match='num_eval_examples'):
    mllm_data.eval_records(cfg, 'generation', 7)


def test_config_validation_names_the_key():
  validate_mllm_data_config(default_mllm_data_config())
  bad = {'seq_len': dict(seq_len=0), 'source': dict(source='tfds'),
         'generation_weight': dict(generation_weight=-1.0),
         'both 0': dict(understanding_weight=0.0, generation_weight=0),
         'image_root': dict(image_root='x'), 'tokenizer': dict(tokenizer='nope'),
         'num_eval_examples': dict(num_eval_examples=20_000),
         'questions_per_image': dict(questions_per_image=7),
         'editing_weight': dict(editing_weight=-1.0), 'max_edits': dict(max_edits=0),
         'cannot hold': dict(editing_weight=1.0, images_per_row=3)}
  for match, change in bad.items():
    cfg = default_mllm_data_config()
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
      validate_mllm_data_config(cfg)
  config = config_defaults.base_config()
  config.task = 'mllm'
  config.data = default_mllm_data_config()
  config.data.seq_len = 1
  with pytest.raises(ValueError, match=r'config\.data\.seq_len'):
    config_defaults.validate(config)
  # An empty JSONL path passes validation (a paper config can be planned before its data
  # exists); reading the data names it.
  jsonl = default_mllm_data_config()
  jsonl.source = 'jsonl'
  validate_mllm_data_config(jsonl)
  with pytest.raises(ValueError, match=r'config\.data\.path is empty'):
    mllm_data.make_conversation_sources(jsonl, 'train')


def test_slot_counts():
  paper = anyres.AnyRes(384, 27, PAPER_PINPOINTS)
  assert paper.max_tiles == 4 and paper.features_per_image == 5 * 729  # 768 x 768: 2 x 2
  assert SLOTS.features_per_image == F and SLOTS.codes_per_image == 4
  assert math.prod(anyres.grid_shape((1000, 500), paper)) == 2
  with pytest.raises(ValueError, match='multiples of the tile size'):
    anyres.AnyRes(384, 27, ((384, 700),))


# ---- the plain layout and the ChatML template ------------------------------------------------

PLAIN_IDS = SpecialIds(pad=0, bos=5, eos=6, boi=20, eoi=21)
PLAIN_SLOTS = ImageSlots(image_size=8, discrete_side=2, size_unit=8, anyres=None,
                         layout='plain')


def test_plain_layout_reads_features_and_writes_marked_code_slots():
  """LLaVA's layout: a user image is D^2 unmarked, unsupervised feature slots; an assistant
  image is [BOI] D^2 supervised code slots [EOI]."""
  tok = WordTokenizer()
  und = mllm_sequence.encode_conversation(_understanding(_image(8, 8)), tok, PLAIN_IDS,
                                          PLAIN_SLOTS)
  start = len(tok.encode('<user>')) + 1
  assert und.tokens[start:start + 4].tolist() == [0] * 4
  assert und.continuous_slot[start:start + 4].tolist() == [0, 1, 2, 3]
  assert not und.supervised[start:start + 4].any() and (und.discrete_slot < 0).all()
  gen = mllm_sequence.encode_conversation(_generation(_image(8, 8)), tok, PLAIN_IDS,
                                          PLAIN_SLOTS)
  boi = gen.tokens.tolist().index(20)
  assert gen.tokens[boi:boi + 6].tolist() == [20, 0, 0, 0, 0, 21]
  assert gen.discrete_slot[boi + 1:boi + 5].tolist() == [0, 1, 2, 3]
  assert gen.supervised[boi:boi + 6].all() and (gen.continuous_slot < 0).all()
  assert PLAIN_SLOTS.features_per_image == PLAIN_SLOTS.codes_per_image == 4
  with pytest.raises(ValueError, match="plain layout needs a discrete_side and no anyres"):
    ImageSlots(image_size=8, discrete_side=None, size_unit=8, anyres=SLOTS.anyres,
               layout='plain')
  with pytest.raises(ValueError, match="'rows' image layout needs"):
    PLAIN_IDS.check(None, SLOTS)


def test_chatml_template_is_qwens_format():
  """<|im_start|>role\\n content <|im_end|>\\n per turn, Qwen's default system turn first,
  no BOS; the assistant's text and <|im_end|> are supervised, the newline after it not."""
  tok = text_tokenizer.load_tokenizer('byte')
  ids = SpecialIds(pad=tok.pad_id, bos=tok.bos_id, eos=tok.encode('<|im_end|>')[0], boi=250,
                   eoi=251)
  record = {'kind': 'understanding', 'meta': {}, 'messages': [
      {'role': 'user', 'content': [{'type': 'text', 'text': 'Hi?'}]},
      {'role': 'assistant', 'content': [{'type': 'text', 'text': 'Yes'}]}]}
  seq = mllm_sequence.encode_conversation(record, tok, ids, PLAIN_SLOTS, template='chatml')
  want = ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'
          '<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n')
  assert seq.tokens.tolist() == tok.encode(want)
  supervised = tok.decode(seq.tokens[seq.supervised].tolist())
  assert supervised == 'Yes<|im_end|>'
  prompt = mllm_sequence.encode_conversation(record, tok, ids, PLAIN_SLOTS, template='chatml',
                                             generation_prompt='image')
  assert tok.decode(prompt.tokens[:-1].tolist()).endswith(
      '<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n')
  assert prompt.tokens[-1] == 250
  with pytest.raises(ValueError, match="not the end-of-turn id"):
    mllm_sequence.encode_conversation(record, tok, PLAIN_IDS, PLAIN_SLOTS, template='chatml')
